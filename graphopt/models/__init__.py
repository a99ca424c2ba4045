"""Reference networks written in plain torch (no torchvision/timm)."""
