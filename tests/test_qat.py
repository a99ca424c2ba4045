"""Quantization-aware training: each estimator trains its own parameters, and the exported
integer model computes what the fake-quant model computed."""

import math

import numpy as np
import pytest
import torch
from nets import build, run_ort

import graphopt
from graphopt import from_torch
from graphopt.backends.lowering import lower, ort_kernel_report, to_model
from graphopt.errors import GraphOptError, PassError, PipelineError
from graphopt.passmanager import Context, PassManager, TrainingData
from graphopt.quantizers import parse
from graphopt.training.gradquant import grad_quant


def test_lsq_step_gets_the_scaled_gradient_and_stays_positive():
    q = parse("int4:tensor:lsq", "weights")
    fn, static = q.torch_function(None)
    x = torch.linspace(-1, 1, 64)
    s = torch.tensor(0.1, requires_grad=True)
    fn(x, s, torch.tensor(0.0), *static).pow(2).sum().backward()
    # the same forward with the plain (unscaled) estimator
    plain, st2 = parse("int4:tensor", "weights").torch_function(None)
    s2 = torch.tensor(0.1, requires_grad=True)
    plain(x, s2, torch.tensor(0.0), *st2).pow(2).sum().backward()
    g = 1 / math.sqrt(64 * 7)
    assert s.grad != 0 and torch.allclose(s.grad, s2.grad * g, rtol=1e-4)
    neg = torch.tensor(-0.1, requires_grad=True)  # a step pushed through zero is still a step
    y = fn(x, neg, torch.tensor(0.0), *static)
    assert torch.isfinite(y).all() and torch.allclose(y, fn(x, s.detach().requires_grad_(), torch.tensor(0.0), *static))


def test_lsq_initial_step_is_two_mean_abs_over_sqrt_qp():
    w = np.random.default_rng(0).standard_normal((8, 30)).astype(np.float32)
    params, axis = parse("int4:channel:lsq", "weights").weight_params(w, 0, 1)
    np.testing.assert_allclose(params["scale"], 2 * np.abs(w).mean(1) / math.sqrt(7), rtol=1e-5)


def test_pact_gradient_to_alpha_is_one_above_the_clip():
    q = parse("uint4:tensor:pact", "acts")
    fn, static = q.torch_function(None)
    x = torch.tensor([-1.0, 0.2, 0.5, 2.0, 3.0, 5.0], requires_grad=True)
    scale = torch.tensor(1.5 / 15, requires_grad=True)  # alpha = 1.5
    y = fn(x, scale, torch.tensor(0.0), *static)
    y.sum().backward()
    assert scale.grad.item() == pytest.approx(3 * 15)  # three values >= alpha, d alpha / d scale = 15
    np.testing.assert_array_equal(x.grad.numpy(), [0, 1, 1, 0, 0, 0])
    assert y.detach().max().item() == pytest.approx(1.5)


def test_dorefa_weights_train_through_tanh():
    q = parse("dorefa4", "weights")
    fn, static = q.torch_function(None)
    w = torch.randn(6, 10, requires_grad=True)
    y = fn(w, torch.tensor(2.0), *static)
    assert len(torch.unique(y.detach())) <= 16
    y.sum().backward()
    w2 = w.detach().clone().requires_grad_()
    t = torch.tanh(w2)
    (2.0 * (2 * (t / (2 * t.abs().max()) + 0.5) - 1)).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_binary_and_ternary_use_the_current_weights_and_a_clipped_ste():
    for spec in ("binary:channel", "ternary:channel"):
        q = parse(spec, "weights")
        fn, static = q.torch_function(0)
        w = (torch.randn(4, 12) * 0.5).requires_grad_()
        stale = [torch.ones(4)] * len(q.param_names)
        y = fn(w, *stale, *static)
        np.testing.assert_allclose(y.detach().abs().amax(1).numpy(),
                                   q.apply_np(w.detach().numpy(), {}, 0).__abs__().max(1), rtol=1e-6)
        y.sum().backward()
        np.testing.assert_array_equal(w.grad.numpy(), (w.detach().abs() <= 1).float().numpy())


def test_dorefa_activation_clip_is_scaled_by_the_calibrated_max():
    spec = parse("uint4:tensor:dorefa", "acts")
    p = spec.act_params(-0.5, 6.0)  # a ReLU output of a folded-BN net reaches 6: alpha = 6, not 1
    assert float(p["scale"]) == pytest.approx(6.0 / 15) and float(p["zero_point"]) == 0
    x = np.array([-1.0, 0.2, 3.0, 9.0], np.float32)
    got = spec.apply_np(x, p, None)
    assert got[0] == 0 and got[-1] == pytest.approx(6.0) and abs(got[2] - 3.0) <= 0.2 + 1e-6


def test_dorefa_gradient_quantization_is_identity_forward_and_k_bit_backward():
    torch.manual_seed(0)
    x = torch.randn(200, requires_grad=True)
    y = grad_quant(x, 3)
    assert torch.equal(y.detach(), x.detach())
    g = torch.randn(200)
    y.backward(g)
    m = g.abs().max()
    levels = (x.grad / (2 * m) + 0.5) * 7
    assert torch.allclose(levels, levels.round(), atol=1e-4) and len(torch.unique(x.grad)) <= 8


def _qat(pipeline: str, steps: int = 40, seed: int = 0):
    model, x = build("resnet", seed)
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((256,) + x.shape[1:]).astype(np.float32)
    with torch.no_grad():
        ys = model(torch.from_numpy(xs)).argmax(1).numpy()
    g = from_torch(model, torch.from_numpy(x))
    ctx = Context(calib=xs[:64], train=TrainingData(xs, ys))
    r = PassManager(pipeline).run(g, ctx)
    return r.graph, xs, r


def _export_vs_training(g, xs, proto=None):
    """onnxruntime's outputs on ``xs`` from ``g``'s Q/DQ export (``proto``, or lowered here) and
    the torch fake-quant model's, after checking they are within one output step."""
    if proto is None:
        lowered, rep = lower(g, "qdq")
        proto = to_model(lowered, rep.opset)
    with torch.no_grad():
        sim = graphopt.to_torch(g)(torch.from_numpy(xs)).numpy()
    got = run_ort(proto, xs)
    step = float(np.asarray(g.const_value(g.outputs[0].producer.inputs[1])).max())
    assert np.abs(got - sim).max() <= step * 1.001
    return got, sim


@pytest.mark.parametrize("qat", ["lsq", "pact", "ste", "dorefa"])
def test_qat_trains_and_the_export_computes_what_was_trained(qat):
    before, _, _ = _qat(f"canonicalize,fold-bn,quantize{{weights=int4:channel,acts=uint8:tensor,qat={qat}}}")
    g, xs, r = _qat(f"canonicalize,fold-bn,quantize{{weights=int4:channel,acts=uint8:tensor,qat={qat}}},"
                    "finetune{epochs=2,batch_size=32,lr=0.01,teacher=none,kd_weight=0}")
    fq = [n for n in g.nodes if n.op_type == "FakeQuant" and n.attr("kind") == "act"]
    moved = [not np.array_equal(g.const_value(n.inputs[1]), before.values[n.inputs[1].name].const)
             for n in fq if n.inputs[1].name in before.values]
    if qat in ("lsq", "pact"):
        assert any(moved), "the learned steps/clips did not move"
    # every estimator trains the float weights behind the weight quantizers
    wfq = [n for n in g.nodes if n.op_type == "FakeQuant" and n.attr("kind") == "weight"]
    assert wfq and all(n.inputs[0].name in before.values for n in wfq)
    trained = [not np.allclose(g.const_value(n.inputs[0]), before.values[n.inputs[0].name].const) for n in wfq]
    assert all(trained), f"{qat}: {trained.count(False)} of {len(wfq)} layers' weights did not train"
    got, sim = _export_vs_training(g, xs)
    assert (got.argmax(1) == sim.argmax(1)).mean() >= 0.999


@pytest.mark.parametrize("weights", ["ternary:channel", "binary:channel"])
def test_trained_binary_and_ternary_biases_sit_on_the_trained_weight_scale(weights):
    """Binary and ternary scales follow the weights as they train; the int32 bias grid must use
    that scale, not the stored start, or the integer kernel (which assumes input step x weight
    step) reads the bias codes on another scale than the fake-quant model did."""
    g, xs, r = _qat(f"canonicalize,fold-bn,quantize{{weights={weights},acts=uint8:tensor,qat=lsq}},"
                    "finetune{epochs=2,batch_size=32,lr=0.01,teacher=none,kd_weight=0}")
    lowered, rep = lower(g, "qdq")
    checked = 0
    for n in lowered.nodes:
        if n.op_type not in ("Conv", "Gemm") or len(n.inputs) < 3:
            continue
        x_dq, w_dq, b_dq = (v.producer for v in n.inputs[:3])
        assert {x_dq.op_type, w_dq.op_type, b_dq.op_type} == {"DequantizeLinear"}, n.name
        sx, sw, sb = (np.asarray(lowered.const_value(d.inputs[1]), np.float32) for d in (x_dq, w_dq, b_dq))
        np.testing.assert_array_equal(sb, (sw * sx).astype(np.float32), err_msg=n.name)
        checked += 1
    assert checked == 7
    proto = to_model(lowered, rep.opset)
    kernels = ort_kernel_report(proto)  # onnxruntime fuses a layer only when its bias sits on that grid
    assert not kernels["float"] and kernels["integer"].get("QLinearConv", 0) == 6, kernels
    got, sim = _export_vs_training(g, xs, proto)
    assert (got.argmax(1) == sim.argmax(1)).mean() >= 0.999


def test_grad_bits_inserts_gradient_quantizers_that_the_export_drops():
    g, xs, r = _qat("canonicalize,fold-bn,quantize{weights=int4:channel,qat=lsq,grad_bits=6},"
                    "finetune{epochs=1,batch_size=32,teacher=none,kd_weight=0}")
    assert sum(n.op_type == "GradQuant" for n in g.nodes) == 7
    lowered, rep = lower(g, "qdq")
    assert not any(n.op_type == "GradQuant" for n in lowered.nodes)


def test_qat_errors():
    model, x = build("mlp")
    g = from_torch(model, torch.from_numpy(x))
    with pytest.raises(PassError, match="pact learns the clip of unsigned"):
        PassManager("quantize{acts=int8:tensor,qat=pact}").run(g.copy(), Context(calib=x))
    with pytest.raises(GraphOptError, match="unknown option 'lsq' for apot"):
        parse("apot4:lsq", "weights")
    with pytest.raises(GraphOptError, match="pact learns the clip"):
        parse("int4:tensor:pact", "acts")


def test_pact_clip_pushed_through_zero_stays_a_clip():
    q = parse("uint4:tensor:pact", "acts")
    fn, static = q.torch_function(None)
    x = torch.linspace(-1, 3, 50)
    pos = fn(x, torch.tensor(0.1), torch.tensor(0.0), *static)
    neg = fn(x, torch.tensor(-0.1), torch.tensor(0.0), *static)
    torch.testing.assert_close(neg, pos)
    np.testing.assert_allclose(q.apply_np(x.numpy(), {"scale": np.float32(-0.1), "zero_point": np.float32(0)}, None),
                               pos.numpy(), rtol=1e-6)


def _weights_only(g):
    """Drop the activation and int32 bias quantizers, so a refold can be checked to float
    precision (a rounding flip in an activation quantizer would hide it)."""
    for n in [n for n in g.nodes if n.op_type == "FakeQuant" and n.attr("kind") != "weight"]:
        g.replace_all_uses(n.outputs[0], n.inputs[0])
        g.remove_node(n, safe=False)
    return g


@pytest.mark.parametrize("weights", ["int4:channel:lsq", "ternary:channel", "apot4:channel"])
def test_batch_statistics_bn_starts_as_identity_and_folds_back_exactly(weights):
    model, x = build("resnet", 0)
    xs = np.random.default_rng(0).standard_normal((96,) + x.shape[1:]).astype(np.float32)
    g = from_torch(model, torch.from_numpy(x))
    q = _weights_only(PassManager(f"canonicalize,fold-bn,quantize{{weights={weights},acts=uint8:tensor:lsq}}")
                    .run(g, Context(calib=xs[:32])).graph)
    m = graphopt.to_torch(q, folded_bn="batch")
    assert len(m.bn_folds) == 6  # every Conv whose BN fold-bn folded
    t = torch.from_numpy(xs)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(t), graphopt.to_torch(q)(t))  # identity at the start
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    m.train()
    for i in range(6):  # batch statistics move the BN's running statistics and parameters
        loss = m(t[16 * i:16 * i + 32]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        want = m.eval()(t).numpy()
    bn = m.get_submodule(next(iter(m.bn_folds.values()))["module"])
    assert not torch.allclose(bn.running_mean, bn.bias)  # the statistics moved away from the start
    m.write_back(q)
    with torch.no_grad():
        got = graphopt.to_torch(q)(t).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    m.write_back(q)  # writing the same module back twice folds once
    with torch.no_grad():
        np.testing.assert_array_equal(graphopt.to_torch(q)(t).numpy(), got)


def test_batch_statistics_leave_layers_that_cannot_refold_frozen():
    model, x = build("resnet", 0)
    g = from_torch(model, torch.from_numpy(x))
    q = PassManager("canonicalize,fold-bn,quantize{weights=dorefa4,acts=uint8:tensor}").run(
        g, Context(calib=x)).graph
    assert graphopt.to_torch(q, folded_bn="batch").bn_folds == {}  # tanh normalisation is not scale-equivariant
    plain = PassManager("canonicalize,fold-bn").run(g, Context()).graph
    assert graphopt.to_torch(plain, folded_bn="batch").bn_folds == {}  # no fake-quantized weights
    with pytest.raises(GraphOptError, match="folded_bn must be"):
        graphopt.to_torch(q, folded_bn="train")


def test_two_phase_bn_schedule_resumes_across_the_phase_change(tmp_path):
    from graphopt.training.finetune import FinetuneConfig, finetune

    pipe = "canonicalize,fold-bn,quantize{weights=int4:channel,acts=uint8:tensor,qat=lsq}"
    g0, xs, _ = _qat(pipe)
    ys = np.zeros(len(xs), np.int64)
    ck = str(tmp_path / "qat.pt")
    first = g0.copy()
    cfg = FinetuneConfig(epochs=2, batch_size=64, lr=0.01, bn_batch_epochs=1, checkpoint=ck, max_steps=4)
    finetune(first, xs, ys, None, cfg)  # stops inside phase 1: the checkpoint holds the batch-statistics module
    assert int(torch.load(ck, weights_only=True)["bn_batch"]) == 1
    resumed = g0.copy()
    stats = finetune(resumed, xs, ys, None, FinetuneConfig(epochs=2, batch_size=64, lr=0.01, bn_batch_epochs=1,
                                                           checkpoint=ck, resume=True))
    assert stats["steps"] == 8 and int(torch.load(ck, weights_only=True)["bn_batch"]) == 0
    straight = g0.copy()
    finetune(straight, xs, ys, None, FinetuneConfig(epochs=2, batch_size=64, lr=0.01, bn_batch_epochs=1))
    t = torch.from_numpy(xs)
    with torch.no_grad():
        np.testing.assert_allclose(graphopt.to_torch(resumed)(t).numpy(), graphopt.to_torch(straight)(t).numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_qat_bad_training_data_and_a_divergent_run_keep_the_last_good_checkpoint(tmp_path):
    model, x = build("resnet", 0)
    g = from_torch(model, torch.from_numpy(x))
    xs = np.random.default_rng(0).standard_normal((64,) + x.shape[1:]).astype(np.float32)
    pipe = "canonicalize,fold-bn,quantize{weights=int4:channel,acts=uint4:tensor,qat=lsq},finetune{epochs=3,batch_size=32,"
    wrong = np.random.default_rng(0).standard_normal((64, x.shape[1], 20, 20)).astype(np.float32)
    with pytest.raises(PassError, match=r"training samples have shape \[3, 20, 20\] \(batch excluded\), but model input"):
        PassManager(pipe + "teacher=none}").run(g.copy(), Context(calib=xs, train=TrainingData(wrong, np.zeros(64))))
    calls = {"n": 0}

    def poison(batch, rng):  # epoch 1 (2 steps) trains; the first step of epoch 2 sees a non-finite input
        calls["n"] += 1
        return batch * np.float32("inf") if calls["n"] > 2 else batch

    ck = tmp_path / "qat.pt"
    with pytest.raises(PassError, match="training diverged: the loss is nan at step 3.*the last checkpoint is"):
        PassManager(pipe + f"teacher=none,checkpoint={ck}}}").run(
            g.copy(), Context(calib=xs, train=TrainingData(xs, np.zeros(64, np.int64), poison)))
    state = torch.load(ck, weights_only=True)  # the epoch-1 checkpoint is on disk, whole and finite
    assert int(state["epoch"]) == 0 and int(state["step"]) == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not list(tmp_path.glob("*.tmp*"))


def test_one_bit_activations_and_wider_edges():
    with pytest.raises(GraphOptError, match="1 bit is for unsigned activations"):
        parse("int1:tensor", "acts")
    with pytest.raises(GraphOptError, match="1 bit is for unsigned activations"):
        parse("uint1:channel", "weights")
    g, xs, r = _qat("canonicalize,fold-bn,quantize{weights=binary:channel,acts=uint1:tensor,qat=lsq,first_last_bits=8,"
                    "first_last_act_bits=8},finetune{epochs=1,batch_size=32,teacher=none,kd_weight=0}")
    bits = {n.inputs[0].name: n.attr("bits") for n in g.nodes if n.op_type == "FakeQuant" and n.attr("kind") == "act"}
    first = next(n for n in g.nodes if n.op_type == "Conv")
    last = [n for n in g.nodes if n.op_type in ("Gemm", "MatMul")][-1]
    edge = {first.inputs[0].producer.inputs[0].name, last.inputs[0].producer.inputs[0].name}
    assert all(bits[k] == 8 for k in edge) and sorted(set(b for k, b in bits.items() if k not in edge)) in ([1], [1, 8])
    _export_vs_training(g, xs)


@pytest.mark.parametrize("qat,unsigned_est", [("dorefa", "dorefa"), ("pact", "pact")])
def test_clip_at_zero_estimators_leave_signed_tensors_their_range(qat, unsigned_est):
    g, xs, r = _qat(f"canonicalize,fold-bn,quantize{{weights=int4:channel,acts=uint4:tensor,qat={qat}}}")
    acts = {n.inputs[0].name: n for n in g.nodes if n.op_type == "FakeQuant" and n.attr("kind") == "act"}
    out_fq = g.outputs[0].producer
    ests = {n.attr("estimator") for n in acts.values()}
    assert unsigned_est in ests  # the ReLU outputs
    assert out_fq.attr("estimator") != unsigned_est and g.inputs[0].uses[0][0].attr("estimator") != unsigned_est


def test_lsq_act_init_calib_starts_the_learned_steps_at_the_calibrated_range():
    def act_steps(opts):
        g, _, _ = _qat(f"canonicalize,fold-bn,quantize{{weights=int4:channel,acts=uint4:tensor,{opts}}}")
        fqs = [n for n in g.nodes if n.op_type == "FakeQuant" and n.attr("kind") == "act"]
        return {n.inputs[0].name: float(np.asarray(g.const_value(n.inputs[1]))) for n in fqs}, fqs

    fixed, _ = act_steps("qat=ste")
    calib, fqs = act_steps("qat=lsq,act_init=calib")
    paper, _ = act_steps("qat=lsq")
    assert fixed.keys() == calib.keys() and all(n.attr("estimator") == "lsq" for n in fqs)
    assert all(calib[k] == pytest.approx(fixed[k], rel=1e-6) for k in fixed)  # where the fixed scales start
    assert any(abs(paper[k] - fixed[k]) > 1e-3 * fixed[k] for k in fixed)  # the paper's init differs


def test_lsq_weight_init_calib_starts_the_weight_steps_at_the_weight_method_range():
    def weight_steps(opts):
        g, _, _ = _qat(f"canonicalize,fold-bn,quantize{{weights=int4:channel,acts=uint8:tensor,{opts}}}")
        fqs = [n for n in g.nodes if n.op_type == "FakeQuant" and n.attr("kind") == "weight"]
        return {n.inputs[0].name: np.asarray(g.const_value(n.inputs[1])) for n in fqs}, fqs

    fixed, _ = weight_steps("qat=ste,weight_method=mse")
    calib, fqs = weight_steps("qat=lsq,weight_init=calib,weight_method=mse")
    paper, _ = weight_steps("qat=lsq,weight_method=mse")
    assert fixed.keys() == calib.keys() and all(n.attr("estimator") == "lsq" for n in fqs)
    for k in fixed:
        np.testing.assert_allclose(calib[k], fixed[k], rtol=1e-6)
    assert any(not np.allclose(paper[k], fixed[k], rtol=1e-3) for k in fixed)  # LSQ's 2 mean|w| / sqrt(Qp)


@pytest.mark.parametrize("opt", ["act_init", "weight_init"])
def test_learned_step_starts_reject_an_unknown_value(opt):
    with pytest.raises(PipelineError, match=f"{opt}.*paper|calib"):
        _qat(f"canonicalize,quantize{{weights=int4:channel,acts=uint4:tensor,qat=lsq,{opt}=zero}}")


def test_quant_weight_decay_applies_to_the_learned_steps_only():
    """``quant_weight_decay`` puts the LSQ steps in their own optimizer group: the same value as
    ``weight_decay`` trains exactly what the default does; 0 on the steps leaves the weights'
    decay alone and moves only the steps."""
    from graphopt.training.finetune import FinetuneConfig, param_groups

    q = "canonicalize,fold-bn,quantize{weights=int4:channel,acts=uint8:tensor,qat=lsq}"
    g, _, _ = _qat(q)
    m = graphopt.to_torch(g)
    steps = {m.param_names[n.inputs[1].name] for n in g.nodes
             if n.op_type == "FakeQuant" and n.attr("kind") in ("weight", "act")}
    assert steps and all(k in dict(m.named_parameters()) for k in steps)
    weights = {m.param_names[n.inputs[0].name] for n in g.nodes
               if n.op_type == "FakeQuant" and n.attr("kind") == "weight"}
    assert m.quant_params == steps and not (m.quant_params & weights)
    assert len(param_groups(m, FinetuneConfig())) == 1
    groups = param_groups(m, FinetuneConfig(weight_decay=0.1, quant_weight_decay=0.0))
    assert [len(gr["params"]) for gr in groups] == [sum(p.requires_grad for p in m.parameters()) - len(steps),
                                                    len(steps)]
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]

    ft = "finetune{epochs=1,batch_size=32,lr=0.01,teacher=none,kd_weight=0,weight_decay=0.05"
    base, _, _ = _qat(q + "," + ft + "}")
    same, _, _ = _qat(q + "," + ft + ",quant_weight_decay=0.05}")
    off, _, _ = _qat(q + "," + ft + ",quant_weight_decay=0}")
    names = [n.inputs[1].name for n in g.nodes if n.op_type == "FakeQuant" and n.attr("kind") in ("weight", "act")]
    wnames = [n.inputs[0].name for n in g.nodes if n.op_type == "FakeQuant" and n.attr("kind") == "weight"]
    for k in names + wnames:
        np.testing.assert_array_equal(same.const_value(same.values[k]), base.const_value(base.values[k]))
    assert any(not np.array_equal(off.const_value(off.values[k]), base.const_value(base.values[k])) for k in names)


def test_straight_through_keeps_the_value_bit_for_bit_where_the_usual_form_rounds():
    from graphopt.quantizers.uniform import straight_through

    g = torch.linspace(-7.3, 7.3, 4001, dtype=torch.float32).requires_grad_(True)  # what the gradient follows
    value = torch.clamp(torch.round(g.detach() / 0.37), -2, 1) * 0.37  # a clamped grid: far from g
    usual = g + (value - g).detach()
    assert not torch.equal(usual, value)  # the form it replaces is off by an ulp somewhere here
    out = straight_through(value, g)
    assert torch.equal(out, value)
    out.sum().backward()
    assert torch.equal(g.grad, torch.ones_like(g))


def test_a_learnable_lsq_step_quantizes_a_weight_on_a_rounding_tie_as_the_export_does():
    """Trained weights sit on rounding ties more often than chance (BN refolding lands them there);
    the gradient scaling of a learnable step must not move the step by an ulp, or training and the
    torch back end round a tie to one code and the export to the other."""
    from graphopt.quantizers.uniform import fake_quant_np, lsq_fake_quant

    s = np.linspace(0.01, 0.2, 512, dtype=np.float32)  # one step per output channel
    w = np.repeat((0.5 * s).reshape(-1, 1), 9, 1)  # exactly half a step: round-half-to-even gives code 0
    want = fake_quant_np(w, s.reshape(-1, 1), np.zeros((512, 1), np.float32), -2, 1)
    assert np.all(want == 0)
    st = torch.from_numpy(s).requires_grad_(True)
    g = 1.0 / math.sqrt(9 * 1)  # the scaling lsq_fake_quant applies here: 9 values per step, Qp = 1
    assert not torch.equal((st - st * g).detach() + st * g, st)  # the old scaling moves some steps
    got = lsq_fake_quant(torch.from_numpy(w), st, torch.zeros(512), -2, 1, 0, 0)
    np.testing.assert_array_equal(got.detach().numpy(), want)


def test_a_run_that_ended_after_the_bn_phase_resumes_from_its_checkpoint(tmp_path):
    """The BN phase's end refreshes the int32 bias steps; the checkpoint written after it must
    still load into the module a resumed run builds (the bias steps keep their names)."""
    from graphopt.training.finetune import FinetuneConfig, finetune

    g0, xs, _ = _qat("canonicalize,fold-bn,quantize{weights=int4:channel,acts=uint8:tensor,qat=lsq}")
    ys = np.zeros(len(xs), np.int64)
    ck = str(tmp_path / "qat.pt")
    cfg = dict(epochs=2, batch_size=64, lr=0.01, bn_batch_epochs=1, checkpoint=ck)
    first = g0.copy()
    finetune(first, xs, ys, None, FinetuneConfig(**cfg))
    assert int(torch.load(ck, weights_only=True)["bn_batch"]) == 0  # written by the frozen phase
    bias = [n for n in first.nodes if n.op_type == "FakeQuant" and n.attr("kind") == "bias"]
    assert bias and any(not np.array_equal(first.const_value(n.inputs[1]), g0.values[n.inputs[1].name].const)
                        for n in bias)  # the refresh moved them, under the names they had
    again = g0.copy()
    stats = finetune(again, xs, ys, None, FinetuneConfig(**cfg, resume=True))  # nothing left to train
    assert stats["steps"] == 2 * (len(xs) // 64)
    t = torch.from_numpy(xs)
    with torch.no_grad():
        np.testing.assert_array_equal(graphopt.to_torch(again)(t).numpy(), graphopt.to_torch(first)(t).numpy())
