import itertools

import pytest
import torch

from quant.errors import ConfigError
from quant.methods import make_method
from quant.methods import codebooks as cb
from quant.methods.aqlm import AQLMConfig, Shape, quantize_layer, wider_shape
from quant.methods.intgrid import quantize_groups


def problem(out=5, groups=4, m=2, nbits=4, g=3, seed=0, dtype=torch.float64):
    """A random layer, a random positive-definite H with correlated inputs, and a state."""
    gen = torch.Generator().manual_seed(seed)
    n = groups * g
    W = torch.randn(out, n, generator=gen, dtype=dtype)
    X = torch.randn(n, 4 * n, generator=gen, dtype=dtype)
    X[1] += 0.8 * X[0]
    H = X @ X.t() / X.shape[1]
    codes = torch.randint(0, 1 << nbits, (out, groups, m), generator=gen)
    books = torch.randn(m, 1 << nbits, g, generator=gen, dtype=dtype) * 0.5
    scales = torch.rand(out, generator=gen, dtype=dtype) + 0.5
    return W, H, codes, books, scales


def loss64(W, H, codes, books, scales):
    E = (W - cb.reconstruct(codes, books, scales)).double()
    return float(torch.einsum("ri,ij,rj->", E, H.double(), E))


def test_a_converged_code_sweep_leaves_every_code_optimal_by_brute_force():
    W, H, codes, books, scales = problem()
    losses = [loss64(W, H, codes, books, scales)]
    for _ in range(30):
        new = cb.update_codes(W, H, codes, books, scales)
        losses.append(loss64(W, H, new, books, scales))
        if torch.equal(new, codes):
            break
        codes = new
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:]))
    assert torch.equal(cb.update_codes(W, H, codes, books, scales), codes)  # a fixed point
    best = loss64(W, H, codes, books, scales)
    for r, j, m in itertools.product(range(5), range(4), range(2)):
        for k in range(books.shape[1]):
            trial = codes.clone()
            trial[r, j, m] = k
            assert loss64(W, H, trial, books, scales) >= best - 1e-9 * best


def test_one_sweep_equals_brute_force_coordinate_descent_across_many_groups():
    """More groups than LAZY_GROUPS, so the running gradient is brought up to date in
    several spans; each code must still be the exact best given all the others."""
    groups = 2 * cb.LAZY_GROUPS + 3
    W, H, codes, books, scales = problem(out=3, groups=groups, m=2, nbits=2, g=2, seed=5)
    swept = cb.update_codes(W, H, codes, books, scales)
    expected = codes.clone()
    for j, m in itertools.product(range(groups), range(2)):
        for r in range(3):
            trials = []
            for k in range(4):
                trial = expected.clone()
                trial[r, j, m] = k
                trials.append(loss64(W, H, trial, books, scales))
            expected[r, j, m] = min(range(4), key=trials.__getitem__)
    assert torch.equal(swept, expected)


def sweep_to_convergence(W, H, codes, books, scales, beam):
    losses = [loss64(W, H, codes, books, scales)]
    for _ in range(30):
        new = cb.update_codes(W, H, codes, books, scales, beam=beam)
        losses.append(loss64(W, H, new, books, scales))
        if torch.equal(new, codes):
            break
        codes = new
    assert torch.equal(new, codes)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:]))
    return codes, losses


def test_a_narrow_beam_never_increases_the_loss_and_beats_coordinate_descent():
    W, H, codes, books, scales = problem(out=12, groups=5, nbits=4, seed=3)
    descent, _ = sweep_to_convergence(W, H, codes, books, scales, beam=1)
    beamed, losses = sweep_to_convergence(W, H, codes, books, scales, beam=2)
    assert len(losses) > 2
    assert loss64(W, H, beamed, books, scales) < loss64(W, H, descent, books, scales)


def test_a_full_width_beam_makes_every_pair_of_codes_optimal_by_brute_force():
    W, H, codes, books, scales = problem(nbits=3, seed=4)
    codes, _ = sweep_to_convergence(W, H, codes, books, scales, beam=8)  # 8 = every codeword
    best = loss64(W, H, codes, books, scales)
    for r, j in itertools.product(range(5), range(4)):
        for a, b in itertools.product(range(8), range(8)):
            trial = codes.clone()
            trial[r, j] = torch.tensor([a, b])
            assert loss64(W, H, trial, books, scales) >= best - 1e-9 * best


def index_problem(k=1 << 14, rows=40, g=3, seed=6):
    """A large float64 codebook, a positive-definite H_jj, targets and current codes."""
    gen = torch.Generator().manual_seed(seed)
    book = torch.randn(k, g, generator=gen, dtype=torch.float64)
    A = torch.randn(g, g, generator=gen, dtype=torch.float64)
    H_jj = A @ A.t() + 0.1 * torch.eye(g, dtype=torch.float64)
    target = torch.randn(rows, g, generator=gen, dtype=torch.float64) @ H_jj
    current = torch.randint(0, k, (rows,), generator=gen)
    return book, H_jj, target, current


def scores(book, H_jj, target, codes):
    chosen = book[codes]
    return ((chosen @ H_jj) * chosen).sum(1) - 2 * (chosen * target).sum(1)


def exhaustive_argmin(book, H_jj, target):
    return (((book @ H_jj) * book).sum(1)[None] - 2 * target @ book.t()).argmin(1)


def test_codeword_index_probing_every_cluster_is_the_exhaustive_argmin():
    book, H_jj, target, current = index_problem()
    index = cb.CodewordIndex(book, probe=10 ** 6)
    exhaustive = exhaustive_argmin(book, H_jj, target)
    assert index.probe == int((~index.empty).sum()) == 128  # sqrt(K) clusters, all filled
    assert torch.equal(index.argmin(target, H_jj, current), exhaustive)


def test_codeword_index_is_never_worse_than_the_current_code():
    book, H_jj, target, _ = index_problem(rows=200)
    exhaustive = exhaustive_argmin(book, H_jj, target)
    found = cb.CodewordIndex(book, probe=1).argmin(target, H_jj, exhaustive)
    assert torch.equal(found, exhaustive)  # the best code, when current, is kept
    current = torch.randint(0, book.shape[0], (200,), generator=torch.Generator().manual_seed(1))
    found = cb.CodewordIndex(book, probe=2).argmin(target, H_jj, current)
    assert (scores(book, H_jj, target, found) <= scores(book, H_jj, target, current)).all()
    assert (found != exhaustive).any()  # two probes of 128 clusters do miss: a real approximation


def test_code_sweeps_over_a_large_codebook_go_through_the_index_and_never_increase_the_loss(
        monkeypatch):
    W, H, codes, books, scales = problem(out=6, groups=3, m=1, nbits=14, g=2, seed=7)
    searches = []
    original = cb.CodewordIndex.argmin
    monkeypatch.setattr(cb.CodewordIndex, "argmin",
                        lambda self, *a: searches.append(1) or original(self, *a))
    losses = [loss64(W, H, codes, books, scales)]
    for _ in range(3):
        codes = cb.update_codes(W, H, codes, books, scales)
        losses.append(loss64(W, H, codes, books, scales))
    assert len(searches) == 3 * 3  # every group of every sweep
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0]


def test_codebook_solve_equals_the_float64_least_squares_solution():
    W, H, codes, books, scales = problem(out=8, groups=6, m=2, nbits=2, g=2, seed=1)
    solved = cb.solve_codebooks(W, H, codes, books, scales, iters=200, ridge=0.0)
    # independent: Ŵ is linear in the codebooks, vec(Ŵ) = A theta; minimise the H-norm
    out, n = W.shape
    size = books.numel()
    A = torch.zeros(out * n, size, dtype=torch.float64)
    for t in range(size):
        basis = torch.zeros(size, dtype=torch.float64)
        basis[t] = 1
        A[:, t] = cb.reconstruct(codes, basis.view_as(books), scales).reshape(-1)
    # e H e^T = ||U e||^2 with H = U^T U. A is rank-deficient (a constant moved from one
    # codebook to the other leaves Ŵ unchanged), so solve the factored problem by SVD
    # (gelsd) rather than the normal equations, whose pivoted QR differs between LAPACKs.
    U = torch.block_diag(*[torch.linalg.cholesky(H).t()] * out)
    theta = torch.linalg.lstsq(U @ A, U @ W.reshape(-1), driver="gelsd").solution
    exact = loss64(W, H, codes, theta.view_as(books), scales)
    assert loss64(W, H, codes, solved, scales) == pytest.approx(exact, rel=1e-8)
    assert loss64(W, H, codes, solved, scales) < loss64(W, H, codes, books, scales)


def test_scales_are_each_rows_least_squares_optimum():
    W, H, codes, books, _ = problem(seed=2)
    scales = cb.solve_scales(W, H, codes, books)
    L = torch.linalg.cholesky(H)  # ||e L||^2 = e H e^T
    V = cb.reconstruct(codes, books, torch.ones(W.shape[0], dtype=W.dtype))
    for r in range(W.shape[0]):
        expected = torch.linalg.lstsq((V[r] @ L)[:, None], (W[r] @ L)[:, None]).solution
        assert float(scales[r]) == pytest.approx(float(expected), rel=1e-9)


def test_residual_kmeans_builds_a_16_bit_codebook_from_two_8_bit_ones():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70000, 2, generator=gen)
    codes, books = cb.residual_kmeans(x, 1, 16, 2, gen)
    assert books.shape == (1, 65536, 2) and codes.shape == (70000, 1)
    assert 0 <= int(codes.min()) and int(codes.max()) < 65536
    # every codeword is hi[a] + lo[b]: the table is the sum table of two 256-vector ones
    table = books[0].view(256, 256, 2)
    assert torch.allclose(table - table[:, :1] - table[:1, :] + table[:1, :1],
                          torch.zeros_like(table), atol=1e-5)


def synthetic_layer(out=64, n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=gen)
    X = torch.randn(n, 4 * n, generator=gen) * torch.linspace(0.2, 2.0, n)[:, None]
    return W, X @ X.t() / X.shape[1]


def rel_error(W, W_hat, H):
    E = W - W_hat
    return float(torch.einsum("ri,ij,rj->", E, H, E) / torch.einsum("ri,ij,rj->", W, H, W))


def test_aqlm_layer_beats_rtn_at_the_same_code_bits_and_is_deterministic():
    W, H = synthetic_layer()
    config = AQLMConfig(max_epochs=6, tol=0.0)
    first = quantize_layer(W, H, Shape(2, 6, 6), config)  # 2 code bits per weight
    again = quantize_layer(W, H, Shape(2, 6, 6), config)
    assert torch.equal(first["codes"], again["codes"])
    assert torch.equal(first["books"], again["books"])
    aqlm = rel_error(W, cb.reconstruct(first["codes"], first["books"], first["scales"]), H)
    assert aqlm == pytest.approx(first["rel_loss"], rel=1e-4)
    q, zeros, scales = quantize_groups(W, 2, 16, False)
    rtn = ((q.view(64, 6, 16) - zeros.t()[:, :, None]) * scales.t()[:, :, None]).view(64, 96)
    assert aqlm < 0.5 * rel_error(W, rtn, H)
    # the scales and codebooks stored as fp16 are the ones the error was measured with
    assert torch.equal(first["books"], first["books"].half().float())
    assert torch.equal(first["scales"], first["scales"].half().float())


DEMO_SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
               "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
               "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
               "mlp.down_proj": (576, 1536)}  # one decoder block's linears


def demo_bits_per_weight(method) -> float:
    """Bits per weight of the quantized linears of a model shaped like the demo's (its
    published config, two of its 30 alike blocks), as the method plans it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from quant import plan as plans

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plan = plans.for_method(model, method, torch.float16)
    assert {name.split(".", 3)[3] for name in plan.layers} == set(DEMO_SHAPES)
    return plan.bits_per_weight()


def test_bits_choose_a_shape_per_layer_within_the_codebook_budget():
    method = make_method("aqlm", bits=2, wide_layers="")
    chosen = {name: str(method.choose_shape(*shape, name)[0])
              for name, shape in DEMO_SHAPES.items()}
    # 1x16's codebook is too large for the demo's layers: one 8-bit codebook over 4
    # weights everywhere (one uniform shape, so the checkpoint exports to aqlm)
    assert set(chosen.values()) == {"1x8 g4"}
    assert str(method.choose_shape(4096, 4096)[0]) == "1x16 g8"  # 7B: the paper's 2-bit
    assert str(method.choose_shape(4096, 11008)[0]) == "1x16 g8"
    assert 2.0 < demo_bits_per_weight(method) <= 2.15


def test_wide_layers_get_the_next_smaller_in_group_within_half_again_the_bits():
    method = make_method("aqlm", bits=2)  # default: the up and output projections are wide
    for name in ("mlp.up_proj", "self_attn.o_proj"):
        shape, why = method.choose_shape(*DEMO_SHAPES[name], f"model.layers.3.{name}")
        assert str(shape) == "1x8 g3" and "widened" in why
    for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert str(method.choose_shape(*DEMO_SHAPES[name], f"model.layers.3.{name}")[0]) \
            == "1x8 g4"
    # the default stays within the 2.3 bits per weight on the demo model
    assert 2.2 < demo_bits_per_weight(method) <= 2.3
    # 7B (in 4096 = 2^12, 11008 = 2^8 * 43): no in-group in [6, 8) divides a layer; g4
    # would double the code bits, so every layer keeps 1x16 g8 and says why
    for out_features, in_features, name in [(4096, 11008, "mlp.down_proj"),
                                            (4096, 4096, "self_attn.o_proj")]:
        shape, why = make_method("aqlm", bits=2, wide_layers=".").choose_shape(
            out_features, in_features, name)
        assert str(shape) == "1x16 g8" and "no in-group within half again" in why
    assert str(wider_shape(Shape(1, 8, 4), 192, 576)) == "1x8 g3"  # 2.67 bits <= 3
    assert wider_shape(Shape(2, 8, 8), 576, 1000) is None  # 1000 = 8 * 125: g5 is 3.2 bits
    with pytest.raises(ConfigError, match="not a regex"):
        make_method("aqlm", wide_layers="down_proj(")


def test_bad_codebook_options_give_clear_errors():
    with pytest.raises(ConfigError, match="larger than the"):
        make_method("aqlm", codebooks="1x16").plan_layer("q_proj", 576, 576)
    with pytest.raises(ConfigError, match="does not divide"):
        make_method("aqlm", codebooks="2x8", in_group=7).plan_layer("q_proj", 576, 576)
    with pytest.raises(ConfigError, match="not reachable"):
        make_method("aqlm", bits=9)
    with pytest.raises(ConfigError, match="MxB"):
        make_method("aqlm", codebooks="16")
    with pytest.raises(ConfigError, match="cannot store"):
        make_method("aqlm", codebooks="1x16", bits=3)
    for bad in ({"finetune_steps": -1}, {"distill_steps": -1}, {"distill_lr": 0.0},
                {"finetune_lr": -1e-3}):
        with pytest.raises(ConfigError, match="must be >= 0"):
            make_method("aqlm", **bad)
