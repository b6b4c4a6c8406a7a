"""log p(continuation | context) of a masked diffusion LM, estimated by the masked-diffusion ELBO.

Only the continuation's L tokens are ever masked. With l of them masked (a uniform l-subset M), LLaDA's
conditional estimator (Nie et al. 2025, the lower-variance form used in its evaluations: the number
masked drawn uniformly rather than a time t) is

    log p(c | x)  >=  E_{l ~ U{1..L}} E_M [ (L / l) * sum_{i in M} log p(c_i | x, c outside M) ]

Monte Carlo with S samples: the counts are stratified, l_n = floor(L (n + u) / S) + 1 for one uniform u per
request, and given l_n each sample's subset is uniform. Each l_n alone is uniform on its stratum, not on
1..L; the mixture -- a sample n taken uniformly -- has l uniform on 1..L, so the mean of the S terms is
an unbiased estimate of the bound. For L = 1 every sample masks the one token with weight 1, so the value
is exact and one sample (one forward) is drawn.

The draws of a request (its u and its S subsets) come from a generator seeded by a hash (BLAKE2b, the
same in every process) of the run's seed, the continuation's length L and the request's key: by
default its own tokens (context and continuation), so the Monte Carlo errors of different requests
are independent, and a request's value does not depend on the batch size, the order or the other
requests. Requests given the same key share their masks where their lengths agree: the lm-eval model
gives every request of one question (the choices of a multiple-choice document) the question's content
as key, so the comparison between its choices is paired (common random numbers) while different
questions draw independently, as the harness's standard error assumes.

A row is `prefix + context + continuation (some masked) + suffix` ([CLS] ... [SEP]): the continuation's
end is known, as in the generation canvas. Rows of all requests and samples are batched together,
identical rows are computed once (e.g. the all-masked rows of two same-length choices, or every
choice of a one-token answer), and the head runs only at the masked positions, a chunk at a time.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch


def content_seed(seed: int, *parts: str) -> int:
    """A seed in [0, 2**63) from a run's seed and some text: the same in every process (never Python's
    hash(), which is salted per process), different for different text."""
    digest = hashlib.blake2b(json.dumps([seed, *parts], ensure_ascii=False).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def request_key(context: Sequence[int], continuation: Sequence[int]) -> str:
    """A request's default mask key: its own tokens."""
    return json.dumps([list(context), list(continuation)])


def question_key(requests: Iterable[tuple[str, str]]) -> str:
    """The mask key of every request of one question (the choices of a multiple-choice document): its
    content, each (context, continuation) it asks about, in any order. Two questions share masks only if
    their content is identical."""
    return json.dumps(sorted({(context, continuation) for context, continuation in requests}), ensure_ascii=False)


def mask_generator(seed: int, key: str, length: int) -> torch.Generator:
    return torch.Generator().manual_seed(content_seed(seed, key, str(length)))


def draw_masks(length: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """bool [S, L]: sample n masks l_n stratified tokens of L; S = 1 when L = 1 (exact)."""
    if length < 1:
        raise ValueError("a continuation needs at least one token")
    samples = 1 if length == 1 else samples
    u = torch.rand(1, generator=generator)
    counts = ((torch.arange(samples) + u) * length / samples).floor().long().clamp(max=length - 1) + 1
    ranks = torch.rand(samples, length, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


def sample_terms(token_logprobs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[S]: each sample's (L / l_n) * sum of its masked tokens' log-probabilities, from [S, L] log p(c_i | ...)
    (read only where masked) and the masks [S, L]."""
    length = masks.shape[1]
    weights = length / masks.sum(dim=1).to(token_logprobs.dtype)
    return token_logprobs.masked_fill(~masks, 0).sum(dim=1) * weights


def elbo(token_logprobs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The estimate: the mean of the samples' terms."""
    return sample_terms(token_logprobs, masks).mean()


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), no special tokens: the tokens of `context + continuation`, split
    where the context's own tokens stop matching. A token that straddles the boundary belongs to the
    continuation, so the continuation is never empty while it has text, and nothing outside it is scored.

    Research harnesses (dllm, LLaDA) take `tokenizer(context + continuation)[len(tokenizer(context)):]`
    with the special tokens: for a [CLS] ... [SEP] tokenizer that drops the continuation's first token
    and scores [SEP] instead, so one-letter answers (" A" .. " D") all get the same score."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    alone = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    split = 0
    while split < min(len(whole), len(alone)) and whole[split] == alone[split]:
        split += 1
    if split == len(whole) and continuation:  # the tokenizer merged the continuation into the context's last token
        split = max(split - 1, 0)
    return whole[:split], whole[split:]


@dataclass
class Scored:
    logprob: float
    # greedy decoding (the sampler, temperature 0, one token per step) writes the continuation: read from
    # the one forward for L = 1 (the argmax over what the sampler may write), computed for L > 1 only
    # with check_greedy (else False)
    greedy: bool
    # Monte Carlo standard error, as if the samples were independent (stratifying the count only lowers
    # the variance: conservative); 0 where the value is exact (L = 1)
    stderr: float = 0.0


def fit(context: list[int], continuation: list[int], room: int) -> tuple[list[int], list[int]]:
    """Keep the end of the context (and, if even that is too long, of the continuation) within `room`."""
    if len(continuation) > room:
        warnings.warn(
            f"a continuation of {len(continuation)} tokens exceeds the model's context; scoring its last {room}",
            stacklevel=3,
        )
        return [], continuation[-room:]
    keep = room - len(continuation)
    return (context[-keep:] if keep else []), continuation


@torch.no_grad()
def continuation_logprobs(
    lm,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    mc_num: int = 128,
    seed: int = 0,
    keys: Sequence[str] | None = None,
    batch_size: int = 32,
    head_chunk: int = 512,
    max_rows: int = 8192,
    check_greedy: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[Scored]:
    """Score (context ids, continuation ids) pairs (no special tokens): the ELBO estimate of each.

    `keys`: what each request's masks are seeded from, with `seed` and its length (default: its own
    tokens); requests with one key share their masks (the choices of a question). `batch_size` counts
    rows (a request contributes up to `mc_num` of them); `head_chunk` bounds the positions whose
    [chunk, vocab] logits exist at once; requests are taken `max_rows` rows at a time (consecutive
    requests, so a question's choices share their identical rows).
    """
    prefix, suffix = lm.special_affixes
    room = lm.context_length - len(prefix) - len(suffix)
    keys = [request_key(c, x) for c, x in pairs] if keys is None else list(keys)
    if len(keys) != len(pairs):
        raise ValueError(f"{len(keys)} keys for {len(pairs)} requests")
    pairs = [fit(list(c), list(x), room) for c, x in pairs]
    masks = [
        draw_masks(len(x), mc_num, mask_generator(seed, key, len(x))) if x else None
        for (_, x), key in zip(pairs, keys, strict=True)
    ]
    logps = [torch.zeros(m.shape, dtype=torch.float64) if m is not None else None for m in masks]
    top = [torch.zeros(m.shape, dtype=torch.bool) if m is not None else None for m in masks]
    writable = greedy_vocabulary(lm)
    total, done, group, rows_in_group = sum(m.shape[0] for m in masks if m is not None), 0, [], 0
    for r, m in enumerate(masks):
        if m is not None:
            group.append(r)
            rows_in_group += m.shape[0]
        if group and (rows_in_group >= max_rows or r == len(masks) - 1):
            for read in _score_group(lm, pairs, masks, group, logps, top, batch_size, head_chunk, writable):
                done += read
                if progress:
                    progress(done, total)
            group, rows_in_group = [], 0

    greedy = [bool(m is not None and m.shape[1] == 1 and top[r][0, 0]) for r, m in enumerate(masks)]
    if check_greedy:
        longer = [r for r, m in enumerate(masks) if m is not None and m.shape[1] > 1]
        for r, ok in zip(longer, greedy_decodes(lm, [pairs[r] for r in longer], batch_size), strict=True):
            greedy[r] = ok
    scored = []
    for r, m in enumerate(masks):
        if m is None:  # an empty continuation: log 1
            scored.append(Scored(0.0, True))
            continue
        terms = sample_terms(logps[r], m)
        stderr = float(terms.std() / len(terms) ** 0.5) if len(terms) > 1 else 0.0
        scored.append(Scored(float(terms.mean()), greedy[r], stderr))
    return scored


def greedy_vocabulary(lm) -> tuple[int, torch.Tensor]:
    """What greedy decoding may write at a mask, as the sampler rules it (its Denoiser's own fields): the
    ids below its vocabulary size, except the special tokens it bans."""
    from diffutron.sampling import Denoiser, SamplingConfig

    denoiser = Denoiser(lm, SamplingConfig(temperature=0.0))
    return denoiser.vocab, denoiser.banned


def _score_group(lm, pairs, masks, group, logps, top, batch_size: int, head_chunk: int, writable):
    """Fill logps / top for the requests of `group`; yields the (request, sample) rows read per batch."""
    prefix, suffix = lm.special_affixes
    # unique noisy rows, each with its masked positions and the (request, sample) pairs that read it
    rows: dict[tuple[int, ...], int] = {}
    row_ids: list[list[int]] = []
    row_masked: list[list[int]] = []
    readers: list[list[tuple[int, int]]] = []
    for r in group:
        context, continuation = pairs[r]
        start = len(prefix) + len(context)
        clean = torch.tensor(prefix + context + continuation + suffix)
        for n, m in enumerate(masks[r]):
            noisy = clean.clone()
            noisy[start : start + len(continuation)][m] = lm.mask_id
            key = tuple(noisy.tolist())
            if key not in rows:
                rows[key] = len(row_ids)
                row_ids.append(list(key))
                row_masked.append((m.nonzero().flatten() + start).tolist())
                readers.append([])
            readers[rows[key]].append((r, n))
    order = sorted(range(len(row_ids)), key=lambda u: -len(row_ids[u]))  # less padding per batch
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        length = len(row_ids[batch[0]])
        ids = torch.full((len(batch), length), lm.pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        positions = torch.zeros_like(ids, dtype=torch.bool)
        for i, u in enumerate(batch):
            ids[i, : len(row_ids[u])] = torch.tensor(row_ids[u])
            attention[i, : len(row_ids[u])] = 1
            positions[i, row_masked[u]] = True
        # queries: (flat index among the batch's masked positions, target) for each (request, sample, token)
        flat, targets, where = [], [], []
        offset = 0
        for u in batch:
            count = len(row_masked[u])
            for r, n in readers[u]:
                tokens = masks[r][n].nonzero().flatten()
                flat.append(torch.arange(offset, offset + count))
                targets.append(torch.tensor(pairs[r][1])[tokens])
                where += [(r, n, int(t)) for t in tokens]
            offset += count
        flat, targets = torch.cat(flat), torch.cat(targets)
        logp, is_top = _masked_logprobs(lm, ids, attention, positions, flat, targets, head_chunk, writable)
        for (r, n, t), value, best in zip(where, logp.tolist(), is_top.tolist(), strict=True):
            logps[r][n, t], top[r][n, t] = value, best
        yield sum(len(readers[u]) for u in batch)


def _masked_logprobs(lm, ids, attention, positions, flat, targets, chunk: int, writable):
    """log p(target) and whether it is what greedy decoding writes there (the argmax over the `writable`
    (vocabulary size, banned ids) of greedy_vocabulary), for each query into the batch's masked positions."""
    vocab, banned = writable
    device = lm.device
    ids, attention, positions = ids.to(device), attention.to(device), positions.to(device)
    flat, targets = flat.to(device), targets.to(device)
    try:
        hidden = lm.encode(ids, attention)[positions]
        chunks = ((a, lambda a=a: lm.head(hidden[a : a + chunk])) for a in range(0, hidden.shape[0], chunk))
    except NotImplementedError:  # no sparse head for this architecture: the model's own logits, gathered
        logits = lm(ids, attention, positions=positions)
        chunks = ((a, lambda a=a: logits[a : a + chunk]) for a in range(0, logits.shape[0], chunk))
    logp = torch.empty(len(flat), dtype=torch.float64, device=device)
    is_top = torch.empty(len(flat), dtype=torch.bool, device=device)
    for a, compute in chunks:
        logits = compute().float()
        hit = (flat >= a) & (flat < a + logits.shape[0])
        local = flat[hit] - a
        logp[hit] = (logits[local, targets[hit]] - logits.logsumexp(dim=-1)[local]).double()
        logits[:, banned.to(device)] = float("-inf")  # in place: only the argmax reads them from here
        is_top[hit] = logits[:, :vocab].argmax(dim=-1)[local] == targets[hit]
    return logp.cpu(), is_top.cpu()


@torch.no_grad()
def greedy_decodes(lm, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 32) -> list[bool]:
    """Whether greedy decoding, one token per step, most confident first (LLaDA's check), writes each
    continuation after its context: the sampler with the confidence policy, temperature 0, L steps."""
    from diffutron.sampling import Canvas, SamplingConfig, denoise

    prefix, suffix = lm.special_affixes
    result = [False] * len(pairs)
    by_length: dict[int, list[int]] = {}
    for r, (_, continuation) in enumerate(pairs):
        by_length.setdefault(len(continuation), []).append(r)
    for length, group in by_length.items():
        config = SamplingConfig(steps=length, policy="confidence", temperature=0.0, stop_at_eos=False)
        for b in range(0, len(group), batch_size):
            chunk = group[b : b + batch_size]
            rows = [prefix + pairs[r][0] + [lm.mask_id] * length + suffix for r in chunk]
            width = max(len(row) for row in rows)
            ids = torch.tensor([row + [lm.pad_id] * (width - len(row)) for row in rows])
            attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
            start = torch.tensor([len(prefix) + len(pairs[r][0]) for r in chunk])
            position = torch.arange(width)[None, :]
            fillable = (position >= start[:, None]) & (position < (start + length)[:, None])
            canvas = Canvas(ids, attention, fillable, start, torch.full((len(chunk),), length))
            for _ in denoise(lm, canvas, config, mode="infill"):
                pass
            for i, r in enumerate(chunk):
                written = canvas.ids[i, int(start[i]) : int(start[i]) + length].tolist()
                result[r] = written == pairs[r][1]
    return result
