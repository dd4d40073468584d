"""Tests that kill the mutants of `fnl/fd_engine.py` the rest of the suite let through (`make mutate`).

Each asserts an exact behaviour of the one FD engine (paper section 3.2; docs/method.md): the terms it
is built from (their tensors, batch, name, grouping key), the argument checks of ``form_term`` /
``layer_term`` / ``FDEngine`` and their messages, the FD gradients of custom, fused and grouped terms
against autograd of the penalty, and how coupled / decoupled / scaled / skipped terms are applied.
"""
import gc

import pytest
import torch
from torch import nn

import fnl
from fnl.fd_engine import FDEngine, FDTerm, factor_owner, form_term, layer_term, mark_factors


def _leaf(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)


def _quekey_penalty(q, k, heads):
    """sum_h (1/2)||W_Q^hᵀ W_K^h||² for (heads*d_h, d) weights."""
    qh = q.reshape(heads, q.shape[0] // heads, q.shape[1])
    kh = k.reshape(heads, k.shape[0] // heads, k.shape[1])
    return 0.5 * (qh.transpose(1, 2) @ kh).pow(2).sum()


def _outval_penalty(o, v, heads):
    """sum_h (1/2)||W_O^h W_V^h||² for W_O (d, heads*d_h), W_V (heads*d_h, d')."""
    oh = o.reshape(o.shape[0], heads, o.shape[1] // heads).transpose(0, 1)  # (heads, d, d_h)
    vh = v.reshape(heads, v.shape[0] // heads, v.shape[1])                # (heads, d_h, d')
    return 0.5 * (oh @ vh).pow(2).sum()


def _close(got, exact, what=""):
    assert got is not None, what
    assert torch.allclose(got, exact, atol=1e-12, rtol=1e-10), f"{what}: {(got - exact).abs().max()}"


# --- registry ---------------------------------------------------------------------------------------

def test_mark_factors_counts_every_layer_and_holds_them_weakly():
    torch.manual_seed(0)
    model = nn.Sequential(fnl.FactorizedLinear(4, 3, rank=2), nn.ReLU(),
                          fnl.FactorizedLinear(3, 3, rank=2, square=True), nn.Linear(3, 2),
                          fnl.FactorizedConv2d(2, 2, 3, rank=2))
    assert mark_factors(model) == 3
    assert all(factor_owner(p) is model[2] for p in (model[2].U, model[2].S, model[2].V))
    assert factor_owner(model[4].U) is model[4] and factor_owner(model[0].V) is model[0]
    assert factor_owner(model[3].weight) is None and factor_owner(model[0].bias) is None
    layer = fnl.FactorizedLinear(4, 3, rank=2)
    assert mark_factors(layer) == 1  # the model itself is a factorized layer
    assert mark_factors(nn.Linear(2, 2)) == 0
    kept = layer.U
    assert factor_owner(kept) is layer
    del layer
    gc.collect()
    assert factor_owner(kept) is None  # the registry does not keep the layer alive


def test_mark_factors_rejects_a_non_module():
    with pytest.raises(TypeError, match=r"^model must be an nn\.Module, got list$"):
        mark_factors([nn.Linear(2, 2)])


# --- FDTerm -----------------------------------------------------------------------------------------

def test_term_params_are_distinct_in_order():
    heads, dh, d = 2, 3, 5
    w = heads * dh
    qkv, proj = _leaf(3 * w, d, seed=1), _leaf(d, w, seed=2)
    fused = form_term("quekey", qkv, qkv, heads, slice(0, w), slice(w, 2 * w))
    assert len(fused.tensors) == 3 and fused.tensors[1] is None
    got = fused.params()
    assert len(got) == 1 and got[0] is qkv
    ov = form_term("outval", proj, qkv, heads, right_rows=slice(2 * w, 3 * w))
    got = ov.params()
    assert len(got) == 2 and got[0] is proj and got[1] is qkv
    a, b = _leaf(3, 2), _leaf(3, 2, seed=1)
    got = FDTerm((a, b, a, b, None, a)).params()
    assert len(got) == 2 and got[0] is a and got[1] is b
    # the engine's params: every distinct tensor over all terms, first seen first
    engine = FDEngine([fused, ov, FDTerm((a, None, b), (lambda t: t.unsqueeze(0), None, lambda t: t.unsqueeze(0)))])
    got = engine.params()
    assert [id(p) for p in got] == [id(qkv), id(proj), id(a), id(b)]
    assert len(engine) == 3
    assert FDEngine([]).params() == [] and len(FDEngine([])) == 0


def test_term_batch_name_and_key():
    torch.manual_seed(0)
    lin = fnl.FactorizedLinear(6, 5, rank=2)
    sq = fnl.FactorizedLinear(6, 5, rank=2, square=True)
    tt = fnl.TTConv2d(8, 8, 1, rank_scale=0.5)
    t_lin, t_sq, t_tt = layer_term(lin), layer_term(sq), layer_term(tt)
    assert (t_lin.name, t_sq.name, t_tt.name) == ("FactorizedLinear", "FactorizedLinear", "TTConv2d")
    assert layer_term(fnl.FactorizedConv2d(3, 4, 3, rank=2)).name == "FactorizedConv2d"
    assert (t_lin.batch(), t_sq.batch(), t_tt.batch()) == (1, 1, 1)
    assert t_tt.layer is tt and t_tt.key() is None
    assert [id(p) for p in t_tt.tensors] == [id(p) for p in tt.factor_parameters()]
    assert t_lin.layer is None and t_lin.tensors == (lin.U, None, lin.V)
    # FactorizedLinear(6, 5) stores U (out, r) and V (in, r)
    assert t_lin.key() == (((5, 2), None, (6, 2)), torch.float32, torch.device("cpu"))
    assert t_sq.key() == (((5, 2), (2, 2), (6, 2)), torch.float32, torch.device("cpu"))
    assert layer_term(lin.double()).key()[1] == torch.float64
    q, k = _leaf(6, 4), _leaf(6, 4, seed=1)
    qk = form_term("quekey", q, k, 3)
    assert qk.batch() == 3 and qk.name == "quekey" and qk.layer is None
    assert qk.key() == (((4, 2), None, (4, 2)), torch.float64, torch.device("cpu"))
    assert form_term("outval", _leaf(4, 6), k, 2, name="blocks.0").name == "blocks.0"
    assert form_term("outval", _leaf(4, 6), k, 2).name == "outval"


# --- argument checks --------------------------------------------------------------------------------

def test_layer_term_refusals():
    with pytest.raises(TypeError, match=r"^layer must be a FactorizedLayer, got Linear$"):
        layer_term(nn.Linear(2, 2))
    tt = fnl.TTConv2d(8, 8, 1, rank_scale=0.5)
    copies = {id(p): p.detach().clone() for p in tt.factor_parameters()}
    with pytest.raises(ValueError, match=r"^TTConv2d computes its own FD gradient from its parameters; it cannot be "
                                         r"applied to master copies$"):
        layer_term(tt, copies)


def test_engine_rejects_a_non_term():
    with pytest.raises(TypeError, match=r"^terms must be FDTerm objects, got int$"):
        FDEngine([layer_term(fnl.FactorizedLinear(3, 3, rank=1)), 3])


@pytest.mark.parametrize("heads", [0, -2, True, False, 2.0, "2", None])
def test_form_term_heads_must_be_a_positive_int(heads):
    q = _leaf(4, 4)
    with pytest.raises(ValueError, match=r"^heads must be an int >= 1, got " + repr(heads).replace(".", r"\.") + "$"):
        form_term("quekey", q, q, heads)


def test_form_term_one_head_is_the_plain_product():
    q, k = _leaf(3, 4, seed=1), _leaf(3, 5, seed=2)
    for p in (q, k):
        p.grad = torch.zeros_like(p)
    term = form_term("quekey", q, k, 1)
    assert term.batch() == 1
    FDEngine([term]).apply_(1.0)
    gq, gk = torch.autograd.grad(0.5 * (q.T @ k).pow(2).sum(), [q, k])
    _close(q.grad, gq, "q")
    _close(k.grad, gk, "k")


def test_form_term_messages():
    q = _leaf(6, 4)
    with pytest.raises(ValueError, match=r"^left_rows applies to a query weight; the output projection is used whole$"):
        form_term("outval", _leaf(4, 6), q, 2, left_rows=slice(0, 6))
    with pytest.raises(ValueError, match=r"^kind must be 'quekey' or 'outval', got 'QUEKEY'$"):
        form_term("QUEKEY", q, q, 2)
    with pytest.raises(ValueError, match=r"^left must be a 2-d weight, got shape \(2, 3, 4\)$"):
        form_term("quekey", _leaf(2, 3, 4), q, 2)
    with pytest.raises(ValueError, match=r"^right must be a 2-d weight, got shape \(24,\)$"):
        form_term("quekey", q, _leaf(24), 2)
    with pytest.raises(ValueError, match=r"^left must be a 2-d weight, got shape \(2, 3, 4\)$"):
        form_term("outval", _leaf(2, 3, 4), q, 2)
    with pytest.raises(ValueError, match=r"^right must be a 2-d weight, got shape \(6, 4, 1\)$"):
        form_term("outval", _leaf(4, 6), _leaf(6, 4, 1), 2)


def test_form_term_divisibility_is_checked_on_the_per_head_axis():
    """The axis that holds heads*d_h: the rows of a (sliced) Linear weight, the columns of W_O."""
    # rows, not columns: 6 rows (divisible by 3), 4 columns (not)
    q, k = _leaf(6, 4, seed=1), _leaf(6, 4, seed=2)
    assert form_term("quekey", q, k, 3).batch() == 3
    assert form_term("outval", _leaf(5, 6), k, 3).batch() == 3
    with pytest.raises(ValueError, match=r"^quekey left: heads=4 must divide the per-head dimension axis of size 6$"):
        form_term("quekey", _leaf(6, 8), _leaf(8, 8), 4)
    with pytest.raises(ValueError, match=r"^quekey right: heads=4 must divide the per-head dimension axis of size 6$"):
        form_term("quekey", _leaf(8, 8), _leaf(6, 8), 4)
    # W_O's columns, not its rows: (8, 6) with 4 heads fails on 6; (6, 8) with 4 heads is fine
    with pytest.raises(ValueError, match=r"^outval left: heads=4 must divide the per-head dimension axis of size 6$"):
        form_term("outval", _leaf(8, 6), _leaf(8, 8), 4)
    with pytest.raises(ValueError, match=r"^outval right: heads=4 must divide the per-head dimension axis of size 6$"):
        form_term("outval", _leaf(6, 8), _leaf(6, 8), 4)
    assert form_term("outval", _leaf(6, 8), _leaf(8, 6), 4).batch() == 4
    # a slice is checked, not the whole fused weight: 8 rows divide by 2, the 3-row slices do not
    fused = _leaf(8, 4)
    with pytest.raises(ValueError, match=r"^quekey left: heads=2 must divide the per-head dimension axis of size 3$"):
        form_term("quekey", fused, fused, 2, slice(0, 3), slice(4, 8))
    with pytest.raises(ValueError, match=r"^quekey right: heads=2 must divide the per-head dimension axis of size 3$"):
        form_term("quekey", fused, fused, 2, slice(0, 4), slice(5, 8))
    with pytest.raises(ValueError, match=r"^outval right: heads=2 must divide the per-head dimension axis of size 3$"):
        form_term("outval", _leaf(4, 4), fused, 2, right_rows=slice(5, 8))


def test_form_term_projections_must_share_d_h():
    with pytest.raises(ValueError, match=r"^quekey: the two projections must have the same heads and d_h, got "
                                         r"\(2, 3, 2\) and \(2, 3, 3\) as \(heads, d, d_h\)$"):
        form_term("quekey", _leaf(4, 3), _leaf(6, 3), 2)
    with pytest.raises(ValueError, match=r"^outval: the two projections must have the same heads and d_h, got "
                                         r"\(2, 5, 3\) and \(2, 4, 2\) as \(heads, d, d_h\)$"):
        form_term("outval", _leaf(5, 6), _leaf(4, 4), 2)
    # d may differ between the two (a cross-attention's key input)
    assert form_term("quekey", _leaf(4, 3), _leaf(4, 7), 2).batch() == 2


# --- FD gradients -----------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["left", "right", "both", "none"])
def test_quekey_slices_on_one_side_only(which):
    """A fused weight on one side, a separate weight on the other (or none, or both fused): the FD
    gradient of each side lands in the right rows of the right tensor."""
    heads, dh, d = 2, 3, 4
    w = heads * dh
    fused = _leaf(3 * w, d, seed=1)
    other = _leaf(w, d, seed=2)
    if which == "left":
        left, right, lr_, rr = fused, other, slice(w, 2 * w), None
    elif which == "right":
        left, right, lr_, rr = other, fused, None, slice(2 * w, 3 * w)
    elif which == "both":
        left, right, lr_, rr = fused, fused, slice(0, w), slice(2 * w, 3 * w)
    else:
        left, right, lr_, rr = other, fused[:w].detach().clone().requires_grad_(True), None, None
    for p in {id(left): left, id(right): right}.values():
        p.grad = torch.zeros_like(p)
    term = form_term("quekey", left, right, heads, lr_, rr)
    assert term.batch() == heads
    FDEngine([term]).apply_(0.7)
    q = left if lr_ is None else left[lr_]
    k = right if rr is None else right[rr]
    exact = torch.autograd.grad(0.7 * _quekey_penalty(q, k, heads), list({id(left): left, id(right): right}.values()))
    for p, e in zip({id(left): left, id(right): right}.values(), exact):
        _close(p.grad, e)


def test_outval_on_separate_weights_with_different_widths():
    heads, dh, d_out, d_in = 3, 2, 5, 4
    o, v = _leaf(d_out, heads * dh, seed=3), _leaf(heads * dh, d_in, seed=4)
    o.grad, v.grad = torch.zeros_like(o), torch.zeros_like(v)
    FDEngine([form_term("outval", o, v, heads)]).apply_(0.4)
    go, gv = torch.autograd.grad(0.4 * _outval_penalty(o, v, heads), [o, v])
    _close(o.grad, go, "W_O")
    _close(v.grad, gv, "W_V")


def test_grouped_forms_with_different_heads_are_split_by_batch():
    """Two query-key terms of the same (d, d_h) but 2 and 3 heads share one batched computation; each
    gets its own heads' gradients back, with its own coefficient."""
    dh, d = 2, 4
    q1, k1 = _leaf(2 * dh, d, seed=1), _leaf(2 * dh, d, seed=2)
    q2, k2 = _leaf(3 * dh, d, seed=3), _leaf(3 * dh, d, seed=4)
    for p in (q1, k1, q2, k2):
        p.grad = torch.zeros_like(p)
    engine = FDEngine([form_term("quekey", q1, k1, 2), form_term("quekey", q2, k2, 3)])
    assert len(engine._groups) == 1
    engine.apply_([0.5, 2.0])
    exact = torch.autograd.grad(0.5 * _quekey_penalty(q1, k1, 2) + 2.0 * _quekey_penalty(q2, k2, 3), [q1, k1, q2, k2])
    for p, e in zip((q1, k1, q2, k2), exact):
        _close(p.grad, e)


def _t_view(t):
    return t.mT.unsqueeze(0)


def _b1(t):
    return t.unsqueeze(0)


def test_custom_term_with_transposed_storage():
    """A term whose V is stored transposed (r, n) and read through a view: the engine uses the views,
    never the raw tensors, also with ``S`` present."""
    m, r, n = 5, 2, 4
    u, s, vt = _leaf(m, r, seed=1), _leaf(r, r, seed=2), _leaf(r, n, seed=3)
    for p in (u, s, vt):
        p.grad = torch.ones_like(p)
    FDEngine([FDTerm((u, s, vt), (_b1, _b1, _t_view), name="custom")]).apply_(0.3)
    exact = torch.autograd.grad(0.15 * (u @ s @ vt).pow(2).sum(), [u, s, vt])
    for p, e, what in zip((u, s, vt), exact, "USV"):
        _close(p.grad, 1.0 + e, what)


def test_layer_term_on_master_copies():
    """``copies``: the FD gradient is computed from and written to the copies, the layer untouched."""
    torch.manual_seed(5)
    layer = fnl.FactorizedLinear(6, 5, rank=2, square=True)
    with torch.no_grad():
        layer.S.add_(0.5 * torch.randn_like(layer.S))
    copies = {id(p): p.detach().double().clone() for p in layer.factor_parameters()}
    for c in copies.values():
        c.grad = torch.zeros_like(c)
    for p in layer.factor_parameters():
        p.grad = torch.zeros_like(p)
    term = layer_term(layer, copies)
    assert [id(t) for t in term.tensors] == [id(copies[id(layer.U)]), id(copies[id(layer.S)]), id(copies[id(layer.V)])]
    FDEngine([term]).apply_(0.2)
    for p in layer.factor_parameters():
        assert torch.count_nonzero(p.grad) == 0
    cu, cs, cv = (copies[id(p)].detach().requires_grad_(True) for p in (layer.U, layer.S, layer.V))
    exact = torch.autograd.grad(0.1 * (cu @ cs @ cv.T).pow(2).sum(), [cu, cs, cv])
    for p, e in zip((layer.U, layer.S, layer.V), exact):
        _close(copies[id(p)].grad, e)


# --- how the terms are applied ----------------------------------------------------------------------

def _two_linears():
    torch.manual_seed(7)
    return [fnl.FactorizedLinear(6, 5, rank=2, dtype=torch.float64) for _ in range(2)]


def test_coef_and_lr_lengths():
    engine = FDEngine([layer_term(m) for m in _two_linears()])
    with pytest.raises(ValueError, match=r"^coef and lr must have one entry per term \(2\), got 3 and 2$"):
        engine.apply_([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"^coef and lr must have one entry per term \(2\), got 2 and 1$"):
        engine.apply_(0.1, lr=[0.5])


def test_mixed_coupled_decoupled_scaled_and_skipped():
    """In one group: term 0 coupled (its gradient times the loss scale), term 1 decoupled (a step of
    -lr*coef*FD on the parameters, not scaled, gradients untouched); a zero coefficient skips a term;
    a tensor without a gradient gets no FD while its partner does."""
    a, b = _two_linears()
    ua, va, ub, vb = (t.detach().clone() for t in (a.U, a.V, b.U, b.V))
    ga = {n: torch.randn_like(p) for n, p in a.named_parameters()}
    for n, p in a.named_parameters():
        p.grad = ga[n].clone()
    b.U.grad, b.V.grad = torch.full_like(b.U, 2.0), None
    engine = FDEngine([layer_term(a), layer_term(b)])
    engine.apply_([0.3, 0.4], lr=[None, 0.5], grad_scale=torch.tensor([8.0]), found_inf=torch.tensor(0.0))
    _close(a.U.grad, ga["U"] + 8.0 * 0.3 * ua @ (va.T @ va), "a.U")
    _close(a.V.grad, ga["V"] + 8.0 * 0.3 * va @ (ua.T @ ua), "a.V")
    assert torch.equal(a.U, ua) and torch.equal(a.V, va)
    _close(b.U.detach(), ub - 0.5 * 0.4 * ub @ (vb.T @ vb), "b.U")
    assert torch.equal(b.V, vb) and b.V.grad is None
    assert torch.equal(b.U.grad, torch.full_like(b.U, 2.0))
    # found_inf set: the decoupled step is skipped, the coupled gradient still added
    b2u = b.U.detach().clone()
    before = a.U.grad.clone()
    engine.apply_([0.3, 0.4], lr=[None, 0.5], found_inf=torch.tensor([1.0]))
    assert torch.equal(b.U, b2u)
    _close(a.U.grad, before + 0.3 * ua @ (va.T @ va), "a.U after")
    # coefficient zero: that term is left alone
    g = a.U.grad.clone()
    engine.apply_([0.0, 0.4])
    assert torch.equal(a.U.grad, g)
    # no gradient at all on a term: nothing happens to it, not even a decoupled step
    a.U.grad = a.V.grad = None
    b.U.grad = None
    bu = b.U.detach().clone()
    engine.apply_([0.3, 0.4], lr=[0.1, 0.1])
    assert a.U.grad is None and a.V.grad is None and torch.equal(a.U, ua) and torch.equal(b.U, bu)


def test_own_fd_layer_term_adds_to_the_saved_gradient():
    """A layer with its own FD gradient: the engine adds coef times its FD gradient to the gradient the
    cores held (scaled like the others, or as a decoupled step); a core without a gradient stays None."""
    torch.manual_seed(8)
    tt = fnl.TTConv2d(8, 8, 1, rank_scale=0.5).double()
    cores = tt.factor_parameters()
    assert len(cores) >= 2
    ref = fnl.TTConv2d(8, 8, 1, rank_scale=0.5).double()
    ref.load_state_dict(tt.state_dict())
    for p in ref.factor_parameters():
        p.grad = torch.zeros_like(p)
    ref.add_frobenius_grad_(1.0)
    fd = [p.grad.clone() for p in ref.factor_parameters()]
    base = [torch.randn_like(p) for p in cores]
    for p, g in zip(cores, base):
        p.grad = g.clone()
    cores[0].grad = None
    engine = FDEngine([layer_term(tt)])
    engine.apply_(0.25, grad_scale=torch.tensor(4.0))
    assert cores[0].grad is None
    for p, g, f in zip(cores[1:], base[1:], fd[1:]):
        _close(p.grad, g + 4.0 * 0.25 * f)
    before = [p.detach().clone() for p in cores]
    grads = [None if p.grad is None else p.grad.clone() for p in cores]
    engine.apply_(0.25, lr=[2.0])
    assert torch.equal(cores[0], before[0])
    for p, b, f, g in zip(cores[1:], before[1:], fd[1:], grads[1:]):
        _close(p.detach(), b - 0.5 * f)
        assert torch.equal(p.grad, g)


def test_same_shapes_different_dtypes_are_not_mixed():
    """Terms of the same shapes but float32 / float64 factors form two groups: the float64 one keeps its
    precision, and an int coefficient is accepted as a number."""
    torch.manual_seed(9)
    single = fnl.FactorizedLinear(6, 5, rank=2)
    double = fnl.FactorizedLinear(6, 5, rank=2, dtype=torch.float64)
    with torch.no_grad():
        double.U.copy_(torch.randn_like(double.U) * 3.0)
    for p in (*single.factor_parameters(), *double.factor_parameters()):
        p.grad = torch.zeros_like(p)
    engine = FDEngine([layer_term(single), layer_term(double)])
    assert len(engine._groups) == 2
    engine.apply_(2)
    for layer, tol in ((single, 1e-5), (double, 1e-13)):
        u, v = layer.U.detach().double(), layer.V.detach().double()
        for got, exact in ((layer.U.grad, 2 * u @ (v.T @ v)), (layer.V.grad, 2 * v @ (u.T @ u))):
            assert got.dtype == layer.U.dtype
            err = ((got.double() - exact).abs().max() / exact.abs().max()).item()
            assert err <= tol, f"{layer.U.dtype}: {err}"


def test_zero_coefficient_term_is_not_computed():
    """A term with coefficient 0 is skipped, not multiplied by 0: non-finite factors (a diverged or
    disabled branch) leave its gradient as it was instead of turning it into NaN."""
    a, b = _two_linears()
    with torch.no_grad():
        a.U[0, 0] = float("inf")
    for p in (*a.factor_parameters(), *b.factor_parameters()):
        p.grad = torch.ones_like(p)
    FDEngine([layer_term(a), layer_term(b)]).apply_([0.0, 0.1], lr=[0.5, None])
    assert torch.equal(a.U.grad, torch.ones_like(a.U)) and torch.equal(a.V.grad, torch.ones_like(a.V))
    assert torch.isinf(a.U[0, 0]) and torch.isfinite(a.V).all()
    u, v = b.U.detach(), b.V.detach()
    _close(b.U.grad, 1.0 + 0.1 * u @ (v.T @ v), "b.U")
    tt = fnl.TTConv2d(8, 8, 1, rank_scale=0.5)
    with torch.no_grad():
        tt.factor_parameters()[0].fill_(float("nan"))
    for p in tt.factor_parameters():
        p.grad = torch.ones_like(p)
    FDEngine([layer_term(tt)]).apply_(0.0)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in tt.factor_parameters())


class _FirstCoreOnly(fnl.TTConv2d):
    """A layer whose own FD gradient writes only its first core (the others get none from it)."""

    @torch.no_grad()
    def add_frobenius_grad_(self, coef: float) -> None:
        p = self.factor_parameters()[0]
        fd = coef * p
        p.grad = fd.clone() if p.grad is None else p.grad.add_(fd)


def test_own_fd_layer_that_leaves_some_cores_without_fd():
    torch.manual_seed(10)
    layer = _FirstCoreOnly(8, 8, 1, rank_scale=0.5).double()
    cores = layer.factor_parameters()
    for p in cores:
        p.grad = torch.full_like(p, 3.0)
    FDEngine([layer_term(layer)]).apply_(0.5)
    _close(cores[0].grad, 3.0 + 0.5 * cores[0].detach(), "core 0")
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in cores[1:])
