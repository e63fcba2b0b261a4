"""SAE feature math: encode, one feature's values, ranking/top-k across positions, sparse entries.

Everything takes an SAE Lens SAE (already ``fold_W_dec_norm``-ed at load) and captured activations as
numpy arrays; dense ``[seq, d_sae]`` results stay inside the caller (the SAEShard replica) and only the
top-k rows leave it.
"""

from __future__ import annotations

import bisect
import copy
import itertools

import numpy as np
import torch

from ..checks import check_sort_indexes
from ..protocol import FeatureActivation
from .errors import RequestError


def is_sequence_sae(sae) -> bool:
    """An SAE whose code at a position depends on the positions before it (SAE Lens's temporal SAE attends over the
    context): it encodes one whole prompt at a time, ``[1, seq, d_in]``, never prompts stacked along positions."""
    return hasattr(sae, "encode_with_predictions")


def encoder_matrix(sae) -> torch.Tensor:
    """``W_enc`` ``[d_in, d_sae]``; a tied SAE (a temporal SAE with ``tied_weights``) encodes with ``W_dec.T``."""
    w = getattr(sae, "W_enc", None)
    return w if w is not None else sae.W_dec.T


def _sae_input(sae, acts: np.ndarray | torch.Tensor) -> torch.Tensor:
    w = encoder_matrix(sae)
    x = torch.as_tensor(acts).to(device=w.device, dtype=w.dtype)
    d_in = w.shape[0]
    if (x.dim() == 3 and x.shape[-1] != d_in and x.shape[-2] * x.shape[-1] == d_in
            and not getattr(sae, "hook_z_reshaping_mode", False)):
        x = x.reshape(x.shape[0], d_in)  # hook_z [seq, head, d_head] for an SAE trained on the flattened heads
    return x


@torch.no_grad()
def encode(sae, acts: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Feature activations ``[seq, d_sae]`` (float32) for activations ``[seq, d_in]`` (or ``[seq, heads, d_head]``).
    A sequence SAE's ``acts`` must be one prompt's."""
    x = _sae_input(sae, acts)
    if is_sequence_sae(sae):
        return sae.encode(x.unsqueeze(0))[0].float()
    return sae.encode(x).float()


# Per-feature parameters of the SAE Lens architectures whose feature i depends only on column i of W_enc and entry
# i of these (an elementwise activation after the linear map): slicing them gives those features' codes.
_FEATURE_VECTORS = ("b_enc", "threshold", "b_gate", "r_mag", "b_mag")


def separable(sae) -> bool:
    """Whether each of the SAE's features can be encoded apart (:func:`encode_columns`): SAE Lens's standard,
    JumpReLU and gated SAEs. Not TopK and its kin, whose features compete, nor a subclass, which may change the
    activation."""
    from sae_lens.saes.gated_sae import GatedSAE
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE
    from sae_lens.saes.standard_sae import StandardSAE

    return type(sae) in (StandardSAE, JumpReLUSAE, GatedSAE)


def columns_view(sae, columns: torch.Tensor):
    """A shallow copy of a :func:`separable` ``sae`` whose encoder has only ``columns`` (a long tensor on the SAE's
    device): its own ``encode`` then gives those features' codes, ``[seq, len(columns)]``."""
    if not separable(sae):
        raise ValueError(f"{type(sae).__name__}'s features cannot be encoded apart")
    view = copy.copy(sae)  # shares every tensor and hook module; only the dicts below are its own
    params = dict(sae._parameters)
    params["W_enc"] = sae.W_enc[:, columns]
    for name in _FEATURE_VECTORS:
        if params.get(name) is not None:
            params[name] = params[name][columns]
    view._parameters = params
    return view


@torch.no_grad()
def encode_columns(sae, acts: np.ndarray | torch.Tensor, columns: list[int]) -> torch.Tensor:
    """``encode(sae, acts)[:, columns]`` (float32 ``[seq, len(columns)]``) of a :func:`separable` SAE without
    computing the other features: one feature costs ``d_in`` multiply-adds a position instead of ``d_in * d_sae``.
    Equal to the full encode to float32 rounding (a matrix-vector product sums in another order than the full
    product)."""
    view = columns_view(sae, torch.as_tensor(columns, dtype=torch.long, device=encoder_matrix(sae).device))
    return view.encode(_sae_input(sae, acts)).float()


@torch.no_grad()
def predicted_similarity(sae, acts: np.ndarray | torch.Tensor) -> np.ndarray:
    """util/similarity-matrix-pred: ``P = encode_with_predictions(x)[1][0]`` (the codes the temporal SAE predicts
    from the context), centred over positions, rows L2-normalised, ``P @ P.T`` -- without row and column 0.
    Centring and the product run in float32 whatever the SAE's dtype. float32 ``[seq - 1, seq - 1]``."""
    if not is_sequence_sae(sae):
        raise RequestError("This SAE has no predicted codes: similarity-matrix-pred needs a temporal SAE")
    _, z_pred = sae.encode_with_predictions(_sae_input(sae, acts).unsqueeze(0))
    p = z_pred[0].float()
    p = torch.nn.functional.normalize(p - p.mean(dim=0, keepdim=True), p=2, dim=-1)
    return (p @ p.T)[1:, 1:].cpu().numpy()


def _first_argmax(values: torch.Tensor) -> tuple[float, int]:
    if values.numel() == 0:
        return 0.0, 0
    m = values.max()
    idx = int(torch.nonzero(values == m)[0, 0])  # first argmax, explicitly
    return float(m), idx


def single_feature(feats: torch.Tensor, index: int, zero_positions: list[int], drop_first: bool,
                   column: int | None = None) -> FeatureActivation:
    """activation/single (SAE path): feature ``index``'s values, in ``feats``' column ``column`` (default: ``index``;
    another when ``feats`` holds only some features' columns, :func:`encode_columns`), with the given (BOS) positions
    zeroed, then position 0 dropped if asked."""
    col = feats[:, index if column is None else column].clone()
    if zero_positions:
        col[zero_positions] = 0
    if drop_first:
        col = col[1:]
    mx, at = _first_argmax(col)
    return FeatureActivation(index=index, values=col.tolist(), max_value=mx, max_value_index=at, sum_values=0.0)


def vector_projection(acts: np.ndarray, vector: list[float]) -> FeatureActivation:
    """activation/single (vector path): ``acts @ vector``, unnormalised; a multi-dimensional hook (``attn.hook_z``:
    [pos, head, d_head]) is flattened per position first."""
    a = torch.as_tensor(acts).float()
    a = a.reshape(a.shape[0], -1)
    v = torch.tensor(vector, dtype=torch.float32, device=a.device)
    if a.shape[-1] != v.shape[0]:
        raise RequestError(f"Vector has length {v.shape[0]} but the hook's activations have width {a.shape[-1]}")
    col = a @ v
    mx, at = _first_argmax(col)
    return FeatureActivation(index=0, values=col.tolist(), max_value=mx, max_value_index=at, sum_values=0.0)


def rank_features(
    feats: torch.Tensor,
    num_results: int,
    sort_by_token_indexes: list[int] | None = None,
    ignore_bos: bool = False,
    feature_filter: list[int] | None = None,
) -> list[FeatureActivation]:
    """The top ``num_results`` features of one SAE on one prompt, best first.

    Sorted by max over positions, or by the sum over ``sort_by_token_indexes`` when given; ties keep
    feature-index order (stable sort), which is what the cross-source merge relies on.
    """
    sort_idx = list(sort_by_token_indexes or [])
    check_sort_indexes(sort_idx, feats.shape[0])
    candidates = None
    cols = feats  # [seq, d_sae]; only the chosen rows are ever copied
    if feature_filter is not None:
        # on feats' device: ``candidates[order]`` below indexes it with a tensor that lives there
        candidates = torch.tensor(sorted(set(feature_filter)), dtype=torch.long, device=feats.device)
        cols = cols[:, candidates]
    zero_bos = ignore_bos and cols.shape[0] > 0
    body = cols[1:] if zero_bos else cols  # a zeroed BOS column only matters as a 0 in the max and argmax
    if body.shape[0] == 0:
        max_values = torch.zeros(cols.shape[1], dtype=cols.dtype, device=cols.device)  # compared with rows below
    else:
        max_values = body.max(dim=0).values
        if zero_bos:
            max_values = max_values.clamp_min(0)
    summed = [i for i in sort_idx if not (zero_bos and i == 0)]
    sums = cols[summed].sum(dim=0) if summed else torch.zeros_like(max_values)
    key = sums if sort_idx else max_values
    order = stable_topk(key[None], num_results)[0]
    rows = cols[:, order].T.contiguous()  # [num_results, seq]
    if zero_bos:
        rows[:, 0] = 0
    max_values = max_values[order]
    # first argmax: the earliest position equal to the max
    max_index = (rows == max_values[:, None]).float().argmax(dim=1) if rows.shape[1] else torch.zeros_like(order)
    feature_ids = candidates[order] if candidates is not None else order
    return [
        FeatureActivation(index=int(f), values=r, max_value=float(mv), max_value_index=int(mi), sum_values=float(sv))
        for f, r, mv, mi, sv in zip(
            feature_ids.tolist(), rows.tolist(), max_values.tolist(), max_index.tolist(), sums[order].tolist()
        )
    ]


def rank_many(feats: torch.Tensor, lengths: list[int], num_results: list[int],
              ignore_bos: list[bool], lazy: bool = False) -> list:
    """``rank_features`` (by max, no filter) of several prompts whose codes are stacked along positions, ``feats``
    ``[sum(lengths), d_sae]``: the same answers, bit for bit, in a dozen tensor ops for the lot instead of a
    dozen per prompt (at 16 prompts x 24 SAEs a shard call's per-prompt ops cost more than its encodes).

    Per prompt: the max over its positions (BOS left out and the max floored at 0 under ``ignore_bos``, as
    rank_features does) by one segment max, the top ``max(num_results)`` of every prompt by one ``stable_topk``
    (whose answer's first k are the top k), each chosen feature's values by one gather, the first argmax by one
    segment min. Prompts whose maxima are not all finite (a NaN, which orders differently under a segment max, or
    an infinity) go prompt by prompt.

    Nothing here makes a ``feats``-sized tensor: on a CPU each one is a fresh allocation that the OS maps page by
    page (a [512, 24576] float32 mask took 44 ms, a full ``isfinite`` 86 ms, next to 3 ms for the segment max)."""
    n, dev = len(lengths), feats.device
    if n == 0:
        return []
    d_sae = feats.shape[1]
    lens = torch.tensor(lengths, device=dev)
    starts = torch.cumsum(lens, 0) - lens
    job = torch.repeat_interleave(torch.arange(n, device=dev), lens)  # [rows]: the prompt each row belongs to
    pos = torch.arange(feats.shape[0], device=dev) - starts[job]  # each row's position in its prompt
    zero_bos = torch.tensor(ignore_bos, device=dev) & (lens > 0)
    bos_row = zero_bos[job] & (pos == 0)
    # a left-out BOS row goes to a spare segment (row n), so each prompt's max is over its body alone
    maxes = torch.full((n + 1, d_sae), float("-inf"), dtype=feats.dtype, device=dev)
    maxes.scatter_reduce_(0, torch.where(bos_row, n, job)[:, None].expand(-1, d_sae), feats, "amax")
    maxes = maxes[:n]
    # rank_features: max over the body, floored at 0 (the zeroed BOS) under ignore_bos; 0 for an empty body
    maxes = torch.where(zero_bos[:, None], maxes.clamp_min(0), maxes)
    maxes = torch.where((lens == 0)[:, None], 0.0, maxes)
    if not bool(torch.isfinite(maxes).all()):  # a NaN in a body makes its max NaN (the segment max propagates it)
        out, at = [], 0
        for ln, k, bos in zip(lengths, num_results, ignore_bos):
            out.append(rank_features(feats[at:at + ln], k, None, bos))
            at += ln
        return out
    k = max(0, min(max(num_results), d_sae))
    order = stable_topk(maxes, k)  # [n, k]
    rows = feats.gather(1, order[job]).masked_fill(bos_row[:, None], 0)  # [rows, k]: each row's prompt's picks
    max_values = maxes.gather(1, order)  # [n, k]
    hit = rows == max_values[job]
    first = torch.where(hit, pos[:, None], feats.shape[0])
    max_index = torch.full((n, k), feats.shape[0], dtype=torch.long, device=dev)
    max_index.scatter_reduce_(0, job[:, None].expand(-1, k), first, "amin")
    max_index = torch.where(max_index == feats.shape[0], 0, max_index)  # an empty prompt's argmax is 0
    batch = _RankedBatch(order, max_values, max_index, rows, lengths, [max(0, min(kk, d_sae)) for kk in num_results])
    if lazy:
        return [Ranking(batch, i) for i in range(n)]
    return [Ranking(batch, i).rows() for i in range(n)]


def _starts(lengths: list[int]) -> list[int]:
    """Where each of consecutive runs of ``lengths`` starts."""
    return list(itertools.accumulate(lengths, initial=0))[:-1]


class _RankedBatch:
    """rank_many's tensors for a batch of prompts, as Python lists (one ``tolist`` each for the whole batch)."""

    __slots__ = ("ids", "mv", "mi", "by_pos", "starts", "lengths", "ks")

    def __init__(self, order, max_values, max_index, rows, lengths, ks):
        self.ids, self.mv, self.mi = order.tolist(), max_values.tolist(), max_index.tolist()
        self.by_pos = rows.T.tolist()  # [k][rows]: each pick's values at every row of the batch
        self.starts = _starts(lengths)
        self.lengths, self.ks = lengths, ks


class Ranking:
    """One prompt's rank_many answer (by max, finite maxima) whose rows are built when asked for: a merge that keeps
    a few of a call's rows (activation/all over several SAEs keeps ``num_results`` of ``num_results`` per SAE) builds
    only those (merge_rankings)."""

    __slots__ = ("_b", "_i")

    def __init__(self, batch: _RankedBatch, i: int):
        self._b, self._i = batch, i

    def __len__(self) -> int:
        return self._b.ks[self._i]

    def scores(self) -> list[float]:
        """Its rows' scores (their max values), in its order (already on the host: no device copy to merge)."""
        return self._b.mv[self._i][:len(self)]

    def row(self, j: int) -> FeatureActivation:
        b, i = self._b, self._i
        at = b.starts[i]
        return FeatureActivation(index=b.ids[i][j], values=b.by_pos[j][at:at + b.lengths[i]], max_value=float(b.mv[i][j]),
                                 max_value_index=int(b.mi[i][j]), sum_values=0.0)

    def rows(self) -> list[FeatureActivation]:
        return [self.row(j) for j in range(len(self))]


def merge_rankings(sources: list[tuple[int, Ranking]], num_results: int) -> list[tuple[int, FeatureActivation]]:
    """``merge_pairs(..., by_sum=False)`` of rankings from rank_many(lazy=True), building only the rows that make it.

    Each ranking is in score-descending order with ties in index order, and its scores are finite; so a stable
    descending sort of the scores of the rankings laid end to end in source order puts ties by source, then index:
    merge_pairs' order. One sort for the lot instead of a key per row."""
    sources = sorted(sources, key=lambda p: p[0])
    if not sources:
        return []
    scores = torch.tensor([v for _, r in sources for v in r.scores()], dtype=torch.float64)  # Python floats: exact
    picks = torch.sort(scores, descending=True, stable=True).indices.tolist()[:num_results]  # merge_pairs' slice
    starts = _starts([len(r) for _, r in sources])
    out = []
    for p in picks:
        k = bisect.bisect_right(starts, p) - 1
        src, r = sources[k]
        out.append((src, r.row(p - starts[k])))
    return out


def stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each row's ``k`` largest values, descending, index order among equal values: the first ``k`` of
    a stable descending sort, without sorting every row (a [73, 24576] stable sort took 30 ms on one thread).

    ``torch.topk`` finds each row's k-th value but leaves the order of ties to the kernel. A row with exactly k
    entries at or above its k-th value takes them; the rest (ties at the k-th value: most SAE features are exactly
    0, so a row with fewer than k active features has many; or NaNs) are sorted."""
    k = max(0, min(k, values.shape[1]))
    if k == 0:
        return torch.empty((values.shape[0], 0), dtype=torch.long, device=values.device)
    kth = torch.topk(values, k, dim=1).values[:, -1:]
    picked = values >= kth
    clean = picked.sum(dim=1) == k
    if bool(clean.all()):
        idx = picked.nonzero()[:, 1].view(-1, k)  # row-major: each row's picks in index order
    else:
        idx = torch.empty((values.shape[0], k), dtype=torch.long, device=values.device)
        idx[clean] = picked[clean].nonzero()[:, 1].view(-1, k)
        idx[~clean] = torch.sort(values[~clean], dim=1, descending=True, stable=True).indices[:, :k]
    order = torch.sort(values.gather(1, idx), dim=1, descending=True, stable=True).indices  # ties keep index order
    return idx.gather(1, order)


def topk_by_token(feats: torch.Tensor, top_k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Per position, the ``top_k`` features (index order among equal values)."""
    idx = stable_topk(feats, max(1, top_k))
    return idx.tolist(), feats.gather(1, idx).tolist()


def active_entries(feats: torch.Tensor, skip_positions: int = 1) -> dict[str, list[list[float]]]:
    """``{"<feature>": [[token_index, value], ...]}`` for every non-zero activation past the first positions."""
    nz = torch.nonzero(feats[skip_positions:])
    out: dict[str, list[list[float]]] = {}
    if nz.numel() == 0:
        return out
    pos = nz[:, 0] + skip_positions
    feat = nz[:, 1]
    vals = feats[pos, feat]
    for p, f, v in zip(pos.tolist(), feat.tolist(), vals.tolist()):
        out.setdefault(str(f), []).append([p, v])
    return out


def merge_ranked(per_source: list[list[FeatureActivation]], num_results: int, by_sum: bool) -> list[tuple[int, FeatureActivation]]:
    """Merge per-source rankings: score descending, ties by source order then feature index."""
    return merge_pairs([(src, row) for src, rows in enumerate(per_source) for row in rows], num_results, by_sum)


def merge_pairs(pairs: list[tuple[int, FeatureActivation]], num_results: int,
                by_sum: bool) -> list[tuple[int, FeatureActivation]]:
    """The best ``num_results`` of ``(source, row)`` pairs: score descending, ties by source then feature index, a
    NaN score first (as torch's descending sort places it in each source's ranking). The order is total, so merging
    the merges of any split of the pairs gives the merge of them all (SAEShard merges its share of a job's
    rankings, ModelDeployment the shares: protocol.MergeGroup)."""
    def key(pair):
        s = pair[1].score(by_sum)
        return (0, 0.0, pair[0], pair[1].index) if s != s else (1, -s, pair[0], pair[1].index)
    return sorted(pairs, key=key)[:num_results]


@torch.no_grad()
def direct_feature_attribution(W_enc: torch.Tensor, v: np.ndarray, pattern: np.ndarray, feature: int, dest: int) -> list[float]:
    """How much each source position contributes, through attention, to ``feature`` at position ``dest``.

    ``dfa[src] = sum_h pattern[h, dest, src] * (v[src, h] . W_enc[h-slice, feature])`` -- the per-source split of
    the encoder's input term ``z[dest] . W_enc[:, feature]``. ``v`` is ``[seq, kv_heads, d_head]`` and
    ``pattern`` ``[heads, seq, seq]``.
    """
    vt = torch.as_tensor(v).float()
    pt = torch.as_tensor(pattern).float()
    n_heads, d_head = pt.shape[0], vt.shape[-1]
    if vt.shape[1] != n_heads:  # grouped-query attention: each kv head serves n_heads / kv_heads query heads
        vt = vt.repeat_interleave(n_heads // vt.shape[1], dim=1)
    w = W_enc[:, feature].detach().float().cpu().reshape(n_heads, d_head)  # [head, d_head]
    per_src_head = torch.einsum("shd,hd->sh", vt, w)  # [seq, head]
    return torch.einsum("hs,sh->s", pt[:, dest, :], per_src_head).tolist()
