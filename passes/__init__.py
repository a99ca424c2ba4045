"""The graphopt pass library. Importing it registers every pass and preset."""

from graphopt.pipeline import register_preset

from . import canonicalize, dfq  # noqa: F401

register_preset("default", "canonicalize", "what `graphopt convert` runs when no pipeline is given")
register_preset("clean", "canonicalize,simplify,canonicalize",
                "canonicalize, then onnxsim for shape plumbing, then canonicalize again")
