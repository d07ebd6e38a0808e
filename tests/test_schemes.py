"""Every scheme against weights computed by hand on a small example, plus the loss normalisers."""
import math

import pytest
import torch

from backend.lm.loss import entropy_from_logits, per_token_ce, scheme_loss, weight_ce
from backend.lm.schemes import SCHEMES, SchemeInputs, get_scheme, kl_per_token

# one sequence, five predicted positions; position 0 is prompt (masked)
LOSS = torch.tensor([[0.3, 2.0, 0.5, 4.0, 0.2]])
MASK = torch.tensor([[False, True, True, True, True]])
REF = torch.tensor([[0.1, 1.0, 1.5, 1.0, 0.2]])
ENT = torch.tensor([[9.0, 1.0, 3.0, 2.0, 0.5]])


def weights(name, **params):
    s = get_scheme(name)
    return s.compute(SchemeInputs(loss=LOSS, mask=MASK, ref_loss=REF, entropy=ENT), s.resolve_params(params))


def close(a, b):
    assert torch.allclose(a, torch.tensor([b], dtype=torch.float32), atol=1e-6), (a, b)


def test_sft():
    close(weights("sft"), [0, 1, 1, 1, 1])


def test_dft_is_target_probability():
    close(weights("dft"), [0, math.exp(-2.0), math.exp(-0.5), math.exp(-4.0), math.exp(-0.2)])


def test_asft_weight_is_dft():
    close(weights("asft"), [0, math.exp(-2.0), math.exp(-0.5), math.exp(-4.0), math.exp(-0.2)])


def test_topk_keeps_lowest_loss():
    # 4 response tokens, keep_ratio 0.5 -> the 2 lowest losses (0.2 and 0.5)
    close(weights("topk", keep_ratio=0.5), [0, 0, 1, 0, 1])
    # default 0.7 -> ceil(2.8) = 3 tokens: 0.2, 0.5, 2.0
    close(weights("topk"), [0, 1, 1, 0, 1])


def test_antiop_soft_clips_above_c():
    # median of (2.0, 0.5, 4.0, 0.2) = (0.5 + 2.0) / 2 = 1.25; c = 3 * 1.25 = 3.75
    close(weights("antiop"), [0, 1, 1, 3.75 / 4.0, 1])
    # clip_mult 1 -> c = 1.25: 2.0 -> 0.625, 4.0 -> 0.3125
    close(weights("antiop", clip_mult=1.0), [0, 1.25 / 2.0, 1, 1.25 / 4.0, 1])


def test_lr_upweights_tokens_that_got_worse():
    p, pr = [math.exp(-v) for v in LOSS[0].tolist()], [math.exp(-v) for v in REF[0].tolist()]
    exp = [0] + [max(0.1, 1 + 2.0 * max(-1, min(1, pr[i] - p[i]))) for i in range(1, 5)]
    close(weights("lr", alpha=2.0), exp)
    # hand check of one entry: token 1 got worse (ref loss 1.0 < 2.0), so its weight is above 1
    assert weights("lr", alpha=2.0)[0, 1] > 1


def test_lr_floor():
    s = get_scheme("lr")
    x = SchemeInputs(loss=torch.tensor([[0.0]]), mask=torch.tensor([[True]]), ref_loss=torch.tensor([[10.0]]))
    # p = 1, p_ref ~ 0: 1 + 5 * (-1) = -4 -> clamped to 0.1
    close(s.compute(x, s.resolve_params({"alpha": 5.0})), [0.1])


def test_rho1_keeps_highest_excess_loss():
    # excess = loss - ref = (1.0, -1.0, 3.0, 0.0); keep 0.5 -> tokens 3 and 1
    close(weights("rho1", keep_ratio=0.5), [0, 1, 0, 1, 0])


def test_entropy_keeps_highest_entropy_response_tokens():
    # response entropies (1.0, 3.0, 2.0, 0.5); prompt's 9.0 must not count; rho 0.25 -> 1 token
    close(weights("entropy", rho=0.25), [0, 0, 1, 0, 0])
    close(weights("entropy"), [0, 0, 1, 0, 0])          # default rho 0.2 -> ceil(0.8) = 1


def test_weights_are_detached_and_zero_outside_mask():
    for name in SCHEMES:
        w = weights(name)
        assert not w.requires_grad
        assert w[0, 0] == 0


def test_unknown_scheme_lists_available():
    with pytest.raises(ValueError, match="available: sft, dft"):
        get_scheme("nope")


@pytest.mark.parametrize("name,params,msg", [
    ("topk", {"keep_ratio": 0.0}, r"keep_ratio=0.0 is outside the allowed range \(0.0, 1.0\]"),
    ("topk", {"keep_ratio": 1.5}, "outside the allowed range"),
    ("entropy", {"rho": -1}, "outside the allowed range"),
    ("antiop", {"clip_mult": 0}, "outside the allowed range"),
    ("sft", {"keep_ratio": 0.5}, "has no parameter keep_ratio"),
])
def test_bad_params_rejected(name, params, msg):
    with pytest.raises(ValueError, match=msg):
        get_scheme(name).resolve_params(params)


def _logits_and_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[:, :2] = -100            # prompt
    labels[1, 5] = -100             # padding
    return logits, labels


def test_per_token_ce_matches_log_softmax():
    logits, labels = _logits_and_labels()
    loss, mask = per_token_ce(logits, labels)
    lp = torch.log_softmax(logits, -1)
    for b in range(2):
        for t in range(5):
            if labels[b, t + 1] != -100:
                assert torch.isclose(loss[b, t], -lp[b, t, labels[b, t + 1]], atol=1e-6)
                assert mask[b, t]
            else:
                assert not mask[b, t]


def test_weight_ce_and_entropy_match_float64_log_softmax():
    logits, labels = _logits_and_labels()
    lp = torch.log_softmax(logits.detach()[:, :-1].double(), -1)
    mask = labels[:, 1:] != -100
    want = torch.where(mask, -lp.gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0], 0.0)
    for chunk in (1, 2, 1024):                                             # row chunks do not change a value
        got = weight_ce(logits, labels, chunk=chunk)
        assert not got.requires_grad
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(entropy_from_logits(logits).double(), -(lp.exp() * lp).sum(-1), rtol=1e-6, atol=0)


def test_schemes_marked_loss_free_ignore_the_loss_values():
    # scheme_loss hands these the backpropagated loss instead of computing the accurate one: they must not read it
    g = torch.Generator().manual_seed(3)
    other = torch.rand(LOSS.shape, generator=g) * 5
    for name, s in SCHEMES.items():
        p = s.resolve_params({})
        a = s.compute(SchemeInputs(loss=LOSS, mask=MASK, ref_loss=REF, entropy=ENT), p)
        b = s.compute(SchemeInputs(loss=other, mask=MASK, ref_loss=REF, entropy=ENT), p)
        assert torch.equal(a, b) != s.uses_loss, name


def test_normalisers():
    logits, labels = _logits_and_labels()
    loss, mask = per_token_ce(logits, labels)
    out = scheme_loss(logits, labels, get_scheme("sft"), {})
    assert torch.isclose(out.total, (loss * mask).sum() / mask.sum())
    s = get_scheme("topk")
    out = scheme_loss(logits, labels, s, s.resolve_params({"keep_ratio": 0.5}))
    kept = out.weights > 0
    assert int(kept.sum()) == math.ceil(0.5 * int(mask.sum()))
    assert torch.isclose(out.total, loss[kept].sum() / kept.sum())       # mean over the kept tokens


def test_asft_adds_kl_against_reference():
    logits, labels = _logits_and_labels()
    ref = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(1))
    s = get_scheme("asft")
    out = scheme_loss(logits, labels, s, s.resolve_params({"kl_lambda": 0.5}), ref_logits=ref)
    loss, mask = per_token_ce(logits, labels)
    p, r = torch.softmax(logits[:, :-1], -1), torch.softmax(ref[:, :-1], -1)
    kl = (r * (r.log() - p.log())).sum(-1)                                # KL(ref || model), by hand
    expected = ((torch.exp(-loss.detach()) * loss + 0.5 * kl) * mask).sum() / mask.sum()
    assert torch.isclose(out.total, expected, atol=1e-6)
    rev = kl_per_token(logits, ref, reverse=True)
    assert torch.allclose(rev, (torch.softmax(logits, -1) * (torch.log_softmax(logits, -1)
                                                              - torch.log_softmax(ref, -1))).sum(-1), atol=1e-6)


def test_reference_required():
    logits, labels = _logits_and_labels()
    with pytest.raises(ValueError, match="needs reference logits"):
        scheme_loss(logits, labels, get_scheme("rho1"), get_scheme("rho1").resolve_params({}))
