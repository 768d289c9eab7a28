"""Every log-prob method against the obvious reference (`naive`), values and gradients.

Small V/H/N and small chunk sizes so that chunk and tile boundaries are crossed:
N = 37 tokens with token_chunk = 8 (4 full chunks and a ragged one of 5), V = 50 with
vocab_chunk = 13 (3 full tiles and a ragged one of 11).
"""

import math

import pytest
import torch

from grpo.logprobs import METHODS, compile_status, default_method, token_logprobs, triton_status

N, H, V = 37, 16, 50
# float32 throughout. An entry of a gradient is a sum over tokens (grad_weight) or over the
# vocabulary (grad_hidden) of terms as large as the tensor's largest entries, so its rounding
# follows the tensor's scale, not its own size: naive itself is ~6e-6 off float64 on
# grad_weight (largest entry ~9), and another BLAS, ISA or thread count sums in another order.
# So gradients are compared to RTOL of each tensor's largest entry (scale_atol), not elementwise.
RTOL, ATOL = 1e-5, 1e-6  # atol only matters for values near 0


def scale_atol(ref: torch.Tensor) -> float:
    return max(ATOL, RTOL * ref.abs().max().item())


# (method, chunk kwargs): every fast path, with chunk sizes that do not divide N or V.
VARIANTS = [
    ("selective", {}),
    ("chunked", {"token_chunk": 8}),
    ("fused", {"token_chunk": 8}),  # one vocab tile; grad_hidden formed in forward
    ("fused", {"token_chunk": 8, "grad_in_forward": False}),  # backward recomputes
    ("fused", {"token_chunk": 8, "vocab_chunk": 13}),  # online logsumexp over 4 tiles
    ("fused", {}),  # default chunk sizes
    ("triton", {"token_chunk": 8, "vocab_chunk": 13}),
    ("triton", {"token_chunk": 8}),
]
# torch.compile takes ~30 s per new shape on a small CPU: `compiled` shares the chunk loop
# of `chunked`, so it only runs the main comparison (with and without entropy).
COMPILED = ("compiled", {"token_chunk": 16})


def ids(variants):
    return [m + "".join(f"-{k}={v}" for k, v in kw.items()) for m, kw in variants]


def skip_reason(method: str) -> str | None:
    if method == "compiled":
        return compile_status()
    if method == "triton":
        return triton_status("cpu")
    return None


def make_inputs(n=N, h=H, v=V, seed=0, scale=0.3, dtype=torch.float32):
    """hidden [n, h], weight [v, h], targets [n] with both vocabulary edges (0 and v-1)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (scale * torch.randn(v, h, generator=gen)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[0] = 0
    targets[-1] = v - 1
    return hidden, weight, targets


def run(method, hidden, weight, targets, temperature=0.7, entropy=False, weight_grad=True, seed=1, **kw):
    """Values and gradients of sum(g * logp) (+ sum(g_ent * entropy)) with non-uniform g."""
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(weight_grad)
    out = token_logprobs(hidden, weight, targets, method=method, temperature=temperature, return_entropy=entropy, **kw)
    logp, ent = out if entropy else (out, None)
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(len(targets), generator=gen) * 2 - 0.5  # mixed signs, not uniform
    loss = (g * logp).sum()
    if entropy:
        loss = loss + (torch.rand(len(targets), generator=gen) * 3 - 1) @ ent
    loss.backward()
    return logp, ent, hidden.grad, weight.grad


def assert_same(got, ref, rtol=RTOL, atol=ATOL):
    for name, a, b in zip(["logp", "entropy", "grad_hidden", "grad_weight"], got, ref):
        if b is None:
            assert a is None, name
            continue
        assert torch.isfinite(a).all(), name
        tol = max(atol, scale_atol(b)) if name.startswith("grad") else atol
        torch.testing.assert_close(a, b, rtol=rtol, atol=tol, msg=lambda m: f"{name}: {m}")


def usable(method_kw):
    reason = skip_reason(method_kw[0])
    if reason:
        pytest.skip(reason)
    return method_kw


@pytest.fixture(params=VARIANTS, ids=ids(VARIANTS))
def variant(request):
    return usable(request.param)


# ------------------------------------------------------------------- hand-worked


@pytest.mark.parametrize("method", ["naive", "selective", "chunked", "fused"])
def test_hand_worked(method):
    # hidden [1, 0] and weight rows [1, 0], [0, 1], [0, 0] give logits z = [1, 0, 0];
    # temperature 0.5 doubles them: z = [2, 0, 0], logsumexp = log(e^2 + 2).
    # logp(0) = 2 - log(e^2 + 2) = -0.2395..., logp(2) = -log(e^2 + 2) = -2.2395...
    # p = [e^2, 1, 1] / (e^2 + 2); entropy = lse - sum p z = log(e^2 + 2) - 2 e^2 / (e^2 + 2).
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    targets = torch.tensor([0, 2])
    logp, ent = token_logprobs(hidden, weight, targets, method=method, temperature=0.5, return_entropy=True)
    lse = math.log(math.e**2 + 2)
    assert logp.dtype == torch.float32 and logp.shape == (2,)
    torch.testing.assert_close(logp, torch.tensor([2 - lse, -lse]), rtol=1e-6, atol=1e-6)
    h = lse - 2 * math.e**2 / (math.e**2 + 2)
    torch.testing.assert_close(ent, torch.tensor([h, h]), rtol=1e-6, atol=1e-6)
    # d logp_0 / d hidden_0 = (onehot - p) @ W / T with k = 1 / (e^2 + 2):
    # onehot - p = [1 - e^2 k, -k, -k] = [2k, -k, -k]; @ W = [2k, -k]; / 0.5 = [4k, -2k].
    logp[0].backward()
    k = 1 / (math.e**2 + 2)
    torch.testing.assert_close(hidden.grad, torch.tensor([[4 * k, -2 * k], [0.0, 0.0]]), rtol=1e-6, atol=1e-6)


def test_naive_entropy_matches_categorical():
    # The reference itself against torch.distributions in float64.
    hidden, weight, targets = make_inputs()
    _, ent = token_logprobs(hidden, weight, targets, method="naive", temperature=0.7, return_entropy=True)
    z = (hidden.double() @ weight.double().T) / 0.7
    ref = torch.distributions.Categorical(logits=z).entropy().float()
    torch.testing.assert_close(ent, ref, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------- fast vs reference


@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("method_kw", VARIANTS + [COMPILED], ids=ids(VARIANTS + [COMPILED]))
def test_matches_naive(method_kw, entropy):
    method, kw = usable(method_kw)
    hidden, weight, targets = make_inputs()
    ref = run("naive", hidden, weight, targets, entropy=entropy)
    assert_same(run(method, hidden, weight, targets, entropy=entropy, **kw), ref)


def test_frozen_weight(variant):
    # The LoRA case: the lm_head does not require grad; only grad_hidden flows.
    method, kw = variant
    hidden, weight, targets = make_inputs(seed=2)
    got = run(method, hidden, weight, targets, weight_grad=False, **kw)
    assert got[3] is None
    assert_same(got, run("naive", hidden, weight, targets, weight_grad=False))


def test_temperature_one_and_single_token(variant):
    method, kw = variant
    hidden, weight, targets = make_inputs(n=1, seed=3)
    assert_same(run(method, hidden, weight, targets, temperature=1.0, **kw), run("naive", hidden, weight, targets, temperature=1.0))


def test_entropy_returned_but_unused_in_loss(variant):
    # Only logp enters the loss: the entropy output gets no gradient (None in backward).
    method, kw = variant
    hidden, weight, targets = make_inputs(seed=4)

    def grads(m, **k):
        h = hidden.clone().requires_grad_(True)
        logp, _ = token_logprobs(h, weight, targets, method=m, temperature=1.3, return_entropy=True, **k)
        (logp * torch.linspace(-1, 2, N)).sum().backward()
        return h.grad

    ref = grads("naive")
    torch.testing.assert_close(grads(method, **kw), ref, rtol=RTOL, atol=scale_atol(ref))


def test_large_magnitude_logits(variant):
    # Logits of order 1e3 (weight std 40, H = 16: logit std 160, / 0.7, max ~800 over
    # 37 x 50): exp would overflow float32 without the max subtraction.
    # A float32 logit of ~800 carries ~6e-5 of rounding (one ulp) that differs between
    # matmul blockings; log-probs and entropy inherit it additively (tolerance: 4 ulps of
    # the largest logit), and p moves by ~6e-5 relative, so the gradients agree to 1e-5
    # of each tensor's largest entry, not elementwise (naive itself is 4e-4 off float64).
    method, kw = variant
    hidden, weight, targets = make_inputs(seed=5, scale=40.0)
    z_max = (hidden @ weight.T / 0.7).abs().max().item()
    assert z_max > 500  # the regime we claim to test
    ulps = 4 * torch.finfo(torch.float32).eps * z_max
    ref = run("naive", hidden, weight, targets, entropy=True)
    got = run(method, hidden, weight, targets, entropy=True, **kw)
    for a, b, atol in zip(got, ref, [ulps, ulps, None, None]):
        assert torch.isfinite(a).all()
        atol = atol or 1e-5 * b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=RTOL, atol=atol)


def test_bf16_hidden_gives_fp32_output(variant):
    # bf16 hidden and lm_head (the trainer's case): matmul in bf16, softmax in float32.
    method, kw = variant
    hidden, weight, targets = make_inputs(seed=6, dtype=torch.bfloat16)
    got = run(method, hidden, weight, targets, entropy=True, **kw)
    ref = run("naive", hidden, weight, targets, entropy=True)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    assert_same(got[:2], ref[:2])
    # Gradients pass through bf16 (8 bits of mantissa: grad of the logits, the matmuls and
    # the result), so they agree to about 2^-7 of each tensor's scale, not elementwise.
    for a, b in zip(got[2:], ref[2:]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())


def test_bf16_hidden_fp32_weight_promotes(variant):
    method, kw = variant
    hidden, weight, targets = make_inputs(seed=7)
    got = run(method, hidden.bfloat16(), weight, targets, **kw)
    ref = run("naive", hidden.bfloat16().float(), weight, targets)  # same numbers in float32
    assert got[2].dtype == torch.bfloat16
    assert_same(got[:2], ref[:2])
    torch.testing.assert_close(got[2].float(), ref[2], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[3], ref[3], rtol=RTOL, atol=ATOL)


def test_no_grad_gives_same_values(variant):
    method, kw = variant
    hidden, weight, targets = make_inputs(seed=8)
    with torch.no_grad():
        got = token_logprobs(hidden.requires_grad_(True), weight, targets, method=method, **kw)
    assert got.grad_fn is None
    torch.testing.assert_close(got, token_logprobs(hidden, weight, targets, method="naive").detach(), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------- API and errors


def test_registry_and_default_method():
    assert set(METHODS) == {"naive", "selective", "chunked", "fused", "compiled", "triton"}
    assert default_method("cpu") == "fused"
    assert default_method(torch.device("cpu")) == "fused"
    assert default_method("cuda") == "fused"  # triton stays opt-in until measured on a GPU


def test_triton_without_cuda_raises_clearly():
    if triton_status("cpu") is None:
        pytest.skip("triton runs here (interpreter mode)")
    hidden, weight, targets = make_inputs()
    with pytest.raises(RuntimeError, match="triton"):
        token_logprobs(hidden, weight, targets, method="triton")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "bogus"}, "unknown method"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"token_chunk": 0}, "token_chunk"),
        ({"vocab_chunk": -3}, "vocab_chunk"),
    ],
)
def test_bad_arguments(kwargs, match):
    hidden, weight, targets = make_inputs()
    with pytest.raises(ValueError, match=match):
        token_logprobs(hidden, weight, targets, **kwargs)


def test_bad_inputs():
    hidden, weight, targets = make_inputs()
    with pytest.raises(ValueError, match="hidden must be"):
        token_logprobs(hidden[None], weight, targets)  # [1, N, H]
    with pytest.raises(ValueError, match="hidden size mismatch"):
        token_logprobs(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="targets must be a 1-D"):
        token_logprobs(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match=r"\[0, 49\]"):
        token_logprobs(hidden, weight, torch.full((N,), V))
    with pytest.raises(ValueError, match=r"\[0, 49\]"):
        token_logprobs(hidden, weight, torch.full((N,), -1))


@pytest.mark.skipif(not torch.cuda.is_available() or triton_status("cuda") is not None, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda_matches_fused(dtype):
    hidden, weight, targets = make_inputs(n=300, h=64, v=1000, dtype=dtype)
    cuda = [x.cuda() for x in (hidden, weight, targets)]
    got = run("triton", *cuda, entropy=True, token_chunk=128, vocab_chunk=384)
    ref = run("fused", *cuda, entropy=True, token_chunk=128)
    rtol = RTOL if dtype == torch.float32 else 1e-2
    for a, b in zip(got, ref):  # bf16: the triton tiles stay bf16, fused casts to float32
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=rtol * b.abs().max().item())
