"""Additive-codebook math for AQLM, minimising a layer's output error

    L = tr((W - Ŵ) H (W - Ŵ)^T),  Ŵ[r, group j] = s_r * sum_m C_m[codes[r, j, m]]

with H = 2/n X X^T. Three exact steps alternate, each never increasing L:
- `update_codes`: for one group at a time (all rows at once), the codes that minimise L
  with every other group fixed, the pairwise H terms included through the running
  gradient G = (W - Ŵ) H; codebooks are searched in pairs by a beam (the `beam` best
  codewords of one codebook, each with every codeword of the other), or one at a time
  (on the CPU, a codebook of more than INDEX_MIN_CODEWORDS through a `CodewordIndex`);
- `solve_codebooks`: the least-squares codebooks for fixed codes and scales, by
  preconditioned conjugate gradients on the normal equations (matvec = gather, @ H, scatter);
- `solve_scales`: the closed-form scale of each row.
Shapes: W [out, in], H [in, in], codes [out, J, M] int64 (J = in/g), books [M, K, g], s [out];
Ŵ = reconstruct(codes, books, s) (the format's own dequantization).
"""

from __future__ import annotations

import torch

from quant.formats.codebook_weight import codeword_uses, reconstruct

SCORE_ENTRIES = 1 << 21  # rows x codewords scored at once: 8 MiB of fp32 stays in cache
TINY_SCALE = 2.0 ** -24  # smallest positive fp16
KMEANS_SAMPLE_PER_CENTROID = 64
MAX_PAIRED_CODEWORDS = 1 << 10  # larger codebooks are searched one at a time
LAZY_GROUPS = 16  # groups whose updates of the running gradient are applied together
INDEX_MIN_CODEWORDS = 1 << 13  # larger codebooks are searched through a CodewordIndex on the CPU
INDEX_PROBE = 16  # clusters whose every codeword a row scores


# ---- initialisation ------------------------------------------------------------------------

def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator):
    """(centroids [k, g], assignment [n]) of Lloyd's k-means on the rows of x [n, g], n >= k,
    started from k distinct random rows; empty clusters keep their centroid. The Lloyd
    steps see a random sample of KMEANS_SAMPLE_PER_CENTROID * k rows: scoring every row
    against every centroid is memory-bound and this is only the initialisation."""
    order = torch.randperm(x.shape[0], generator=generator)
    centroids = x[order[:k]].clone()
    sample = x[order[:KMEANS_SAMPLE_PER_CENTROID * k]]
    for _ in range(iters):
        assign = nearest(sample, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, sample)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
    return centroids, nearest(x, centroids)


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (Euclidean) of each row of x."""
    return _argmin_scores(x, centroids, centroids.pow(2).sum(1))


def residual_kmeans(x: torch.Tensor, num_codebooks: int, nbits: int, iters: int,
                    generator: torch.Generator):
    """Codes [n, M] and codebooks [M, 2^B, g] for x [n, g]: codebook m clusters what the
    earlier ones left. A codebook of more than 8 bits starts as every sum of two half-size
    codebooks found the same way, so a 1x16 code begins where a 2x8 code ends."""
    codes, books, residual = [], [], x.clone()
    for _ in range(num_codebooks):
        if nbits <= 8:
            book, code = kmeans(residual, 1 << nbits, iters, generator)
        else:
            low = nbits // 2
            pair_codes, (hi, lo) = residual_kmeans(residual, 2, nbits - low, iters, generator)
            book = (hi[:, None, :] + lo[None, :, :]).reshape(1 << nbits, -1)
            code = pair_codes[:, 0] * (1 << low) + pair_codes[:, 1]
        residual -= book[code]
        codes.append(code)
        books.append(book)
    return torch.stack(codes, 1), torch.stack(books)


# ---- the three alternating steps -----------------------------------------------------------

def update_codes(W, H, codes, books, scales, beam: int = 1) -> torch.Tensor:
    """One sweep over every group; returns the new codes. Each group's codebooks are taken
    in pairs searched jointly (`beam` >= 2, see `_pair_argmin`), or one at a time (`beam`
    1, or the last of an odd number): coordinate descent, exact per codebook.

    With the other codes fixed, choosing codewords whose sum is v for (row r, group j)
    changes L by s^2 v^T H_jj v - 2 s v^T t_r + const, where t_r = G[r, j] + u_r H_jj, u_r
    is the current contribution of the codebooks being chosen and G = (W - Ŵ) H. Every
    search includes the current codes, so a sweep never increases L."""
    codes = codes.clone()
    m_books, _, g = books.shape
    G = (W - reconstruct(codes, books, scales)) @ H
    inv_s = 1 / scales[:, None]
    sets = [(chosen, books[chosen]) for chosen in _codebook_sets(m_books, books.shape[1], beam)]
    indexes = {m: CodewordIndex(books[m]) for m in range(m_books) if _indexed(books[m])}
    groups = codes.shape[1]
    for first in range(0, groups, LAZY_GROUPS):
        # G is brought up to date once per span of groups (one large matmul): inside the
        # span, a group's columns add the changes made so far in the span themselves
        last = min(groups, first + LAZY_GROUPS)
        span = slice(first * g, last * g)
        changes = torch.zeros(W.shape[0], span.stop - span.start, dtype=W.dtype,
                              device=W.device)  # of W - Ŵ in the span
        for j in range(first, last):
            cols, local = slice(j * g, (j + 1) * g), slice((j - first) * g, (j - first + 1) * g)
            H_jj = H[cols, cols]
            G_j = G[:, cols] + changes @ H[span, cols]
            for chosen, chosen_books in sets:
                u = _codewords(books, codes[:, j], chosen) * scales[:, None]
                target = (G_j + u @ H_jj) * inv_s  # t / s: the argmin is the same for s != 0
                found = _search(target, chosen_books, H_jj, codes[:, j], chosen, beam, indexes)
                for m, code in zip(chosen, found):
                    codes[:, j, m] = code
                change = u - _codewords(books, codes[:, j], chosen) * scales[:, None]
                changes[:, local] += change
                G_j = G_j + change @ H_jj
        G.addmm_(changes, H[span])
    return codes


def _codebook_sets(m_books: int, codewords: int, beam: int) -> list[list[int]]:
    """The codebooks searched together: pairs when there is a beam, singles otherwise
    (and for the last of an odd number, or codebooks too large to pair)."""
    paired = 2 * (m_books // 2) if beam > 1 and codewords <= MAX_PAIRED_CODEWORDS else 0
    return [[m, m + 1] for m in range(0, paired, 2)] + [[m] for m in range(paired, m_books)]


def _search(target, books, H_jj, codes_j, chosen, beam: int,
            indexes: dict) -> tuple[torch.Tensor, ...]:
    """New codes of one group for the one or two codebooks `chosen` (whose vectors are
    `books`), one tensor [R] each."""
    if len(chosen) == 1:
        if chosen[0] in indexes:
            return (indexes[chosen[0]].argmin(target, H_jj, codes_j[:, chosen[0]]),)
        book = books[0]
        return (_argmin_scores(target, book, h_norms(book, H_jj)),)
    return _pair_argmin(target, books, H_jj, codes_j[:, chosen], beam)


def _codewords(books, codes_j, chosen) -> torch.Tensor:
    """Sum over the codebooks `chosen` of each row's codeword in one group."""
    total = books[chosen[0]][codes_j[:, chosen[0]]]
    for m in chosen[1:]:
        total = total + books[m][codes_j[:, m]]
    return total


def _pair_argmin(target, pair, H_jj, current, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (a, b) minimising v^T H_jj v - 2 target.v for v = pair[0][a] + pair[1][b], per
    row, among the `beam` best a on their own (and the current a), each with every b.
    Exhaustive when beam >= 2^B. (Also searching the best b with every a costs more time
    than its error gain: benchmarks/cpu-design-notes.json.)"""
    books_hh = pair @ H_jj                                    # [2, K, g]
    own = (books_hh * pair).sum(2)[:, None] - 2 * target @ pair.transpose(1, 2)  # [2, R, K]
    cross = 2 * books_hh[0] @ pair[1].t()                     # [K, K]: a with b
    k = pair.shape[1]
    width = min(beam, k)
    candidates = torch.cat([own[0].topk(width, 1, largest=False).indices, current[:, :1]], 1)
    chunk = max(1, SCORE_ENTRIES // ((width + 1) * k))
    found_a, found_b = [], []
    for rows in torch.arange(candidates.shape[0]).split(chunk):
        cand = candidates[rows]                               # [rows, width + 1]
        scores = own[0][rows].gather(1, cand)[:, :, None] + own[1][rows][:, None] + cross[cand]
        flat = scores.flatten(1).min(1).indices
        found_a.append(cand.gather(1, (flat // k)[:, None])[:, 0])
        found_b.append(flat % k)
    return torch.cat(found_a), torch.cat(found_b)


def _argmin_scores(target: torch.Tensor, book: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """argmin_c  norms[c] - 2 target[r] . book[c]  for each row r."""
    return _min_scores(target, book, norms)[1]


def _min_scores(target, book, norms) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, argmin) over c of  norms[c] - 2 target[r] . book[c]  for each row r, in row
    chunks."""
    chunk = max(1, SCORE_ENTRIES // book.shape[0])
    # min(): the same first-minimum index as argmin, faster on the CPU
    found = [torch.addmm(norms[None], part, book.t(), alpha=-2).min(1)
             for part in target.split(chunk)]
    return torch.cat([f.values for f in found]), torch.cat([f.indices for f in found])


def _indexed(book: torch.Tensor) -> bool:
    """Whether `update_codes` searches this codebook through a CodewordIndex: on CUDA,
    scoring every codeword is cheap and the index's per-cluster loop is not."""
    return book.device.type == "cpu" and book.shape[0] > INDEX_MIN_CODEWORDS


class CodewordIndex:
    """Approximate argmin over a large codebook (1x16: 65536 codewords), for `update_codes`
    on the CPU, where scoring every codeword of a large row group is slow. The
    codewords are clustered once per sweep (k-means, sqrt(K) clusters); a row scores the
    cluster centres, then every codeword of its `probe` best clusters, the rows that probe
    one cluster together in one matmul. The current code stays a candidate, so a sweep
    never increases L. Sweeps through it reach the exhaustive search's error several times
    faster (benchmarks/cpu-design-notes.json)."""

    def __init__(self, book: torch.Tensor, probe: int = INDEX_PROBE):
        k = book.shape[0]
        clusters = 1 << (k.bit_length() // 2)
        generator = torch.Generator(device=book.device).manual_seed(0)
        centres, assign = kmeans(book, clusters, iters=10, generator=generator)
        counts = torch.bincount(assign, minlength=clusters)
        self.order = torch.argsort(assign, stable=True)  # codeword ids, cluster by cluster
        self.sorted_book = book[self.order]
        self.bounds = [0] + torch.cumsum(counts, 0).tolist()
        self.book, self.centres, self.empty = book, centres, counts == 0
        self.probe = min(probe, int((counts > 0).sum()))

    def argmin(self, target, H_jj, current) -> torch.Tensor:
        """Approximately argmin_c c^T H_jj c - 2 target[r].c per row r; never worse than
        `current`."""
        score, found = self._best_probed(target, H_jj)
        now = self.book[current]
        now_score = h_norms(now, H_jj) - 2 * (now * target).sum(1)
        return torch.where(now_score <= score, current, found)

    def _best_probed(self, target, H_jj) -> tuple[torch.Tensor, torch.Tensor]:
        """(score, codeword) of each row's best codeword in its probed clusters."""
        book, rows = self.sorted_book, target.shape[0]
        norms = h_norms(book, H_jj)
        centre_norms = h_norms(self.centres, H_jj).masked_fill(self.empty, float("inf"))
        probed = torch.addmm(centre_norms[None], target, self.centres.t(), alpha=-2)
        probed = probed.topk(self.probe, 1, largest=False).indices.flatten()  # [rows * probe]
        by_cluster = torch.argsort(probed, stable=True)
        best = torch.empty(rows * self.probe, dtype=target.dtype, device=target.device)
        best_at = torch.empty(rows * self.probe, dtype=torch.long, device=target.device)
        start = 0
        for cluster, n in enumerate(torch.bincount(probed, minlength=len(self.empty)).tolist()):
            pairs, lo, hi = by_cluster[start:start + n], *self.bounds[cluster:cluster + 2]
            if n:  # every (row, probe) pair that probes this cluster, scored together
                best[pairs], at = _min_scores(target[pairs // self.probe], book[lo:hi],
                                              norms[lo:hi])
                best_at[pairs] = at + lo
            start += n
        best, probe = best.view(rows, self.probe).min(1)
        return best, self.order[best_at.view(rows, self.probe).gather(1, probe[:, None])[:, 0]]


def h_norms(vectors: torch.Tensor, H_jj: torch.Tensor) -> torch.Tensor:
    """v^T H_jj v for each row v."""
    return ((vectors @ H_jj) * vectors).sum(1)


def solve_codebooks(W, H, codes, books, scales, iters: int = 20, ridge: float = 1e-6):
    """The codebooks minimising L + ridge' ||C - books||^2 for fixed codes and scales (the
    small proximal term keeps unused codewords where they are), by Jacobi-preconditioned
    conjugate gradients started from `books`."""
    out, groups, m_books = codes.shape
    k, g = books.shape[1], books.shape[2]
    uses = [codeword_uses(codes[:, :, i].reshape(-1), k, W.dtype) for i in range(m_books)]

    def scatter(X):  # adjoint of reconstruct: [out, in] -> [M, K, g]
        rows = (X.reshape(out, groups, g) * scales[:, None, None]).reshape(-1, g)
        return torch.stack([uses[i] @ rows for i in range(m_books)])

    lam = ridge * float(torch.diag(H).mean()) * float(scales.pow(2).mean()) * out * groups / k
    lam = max(lam, 1e-30)

    def apply(D):
        return scatter(reconstruct(codes, D, scales) @ H) + lam * D

    rhs = scatter(W @ H) + lam * books
    diag_h = torch.diag(H).expand(out, -1)
    precond = 1 / (scatter(diag_h * scales[:, None]) + lam)
    x = books.clone()
    r = rhs - apply(x)
    z = precond * r
    p, rz = z.clone(), float((r * z).sum())
    for _ in range(iters):
        Ap = apply(p)
        alpha = rz / max(float((p * Ap).sum()), 1e-30)
        x += alpha * p
        r -= alpha * Ap
        z = precond * r
        rz_next = float((r * z).sum())
        if rz_next <= 1e-12 * rz:
            break
        p = z + (rz_next / rz) * p
        rz = rz_next
    return x


def solve_scales(W, H, codes, books) -> torch.Tensor:
    """s_r = (V_r H W_r^T) / (V_r H V_r^T) for the unscaled reconstruction V."""
    ones = torch.ones(W.shape[0], dtype=W.dtype, device=W.device)
    V = reconstruct(codes, books, ones)
    VH = V @ H
    den = (VH * V).sum(1)
    scales = torch.where(den > 0, (VH * W).sum(1) / den.clamp_min(1e-30), ones)
    # a zero scale would stop update_codes (it divides by s); the smallest fp16 stands in
    return torch.where(scales.abs() < TINY_SCALE, TINY_SCALE, scales)
