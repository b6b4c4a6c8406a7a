"""diffutron as an lm-evaluation-harness model, registered as `diffutron` (needs `pip install 'diffutron[eval]'`).

    import diffutron.harness, lm_eval
    lm_eval.simple_evaluate(model="diffutron", model_args="pretrained=tiny-diffutron,mc_num=32", tasks=[...])
    python -m diffutron.harness --model diffutron --model_args pretrained=PATH --tasks xcopa_tr   # lm-eval's CLI

- loglikelihood: the masked-diffusion ELBO of the continuation, only the continuation masked
  (likelihood.py), every request and Monte Carlo sample batched together. A request's masks are
  seeded from the run's seed and the content of its question (every context and continuation of its
  document): the choices of a question share them (a paired comparison), other questions draw
  independently (the harness's standard error assumes independent items).
- loglikelihood_rolling: the ELBO bound of each document, cut into windows of the model's context,
  each window's masks seeded from its own tokens.
- generate_until: diffutron's sampler, the task's stop strings cut on the text, max_gen_toks. Each
  request draws with its own seed, a hash of the run's seed, its context, its generation settings and
  how many identical requests came before it (lm-eval repeats a request for several samples): its text
  is the same alone or in any batch.

The continuation's tokens are those of the continuation *in context* (likelihood.encode_pair), never
the tokenizer's end token.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter
from collections.abc import Iterable

from diffutron.errors import DiffutronError, UsageError
from diffutron.likelihood import content_seed, encode_pair, question_key

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # the optional extra
    raise DiffutronError("the lm-evaluation-harness is not installed: pip install 'diffutron[eval]'") from err


def _sampling_fields() -> set[str]:
    from diffutron.sampling import SamplingConfig

    return {f.name for f in dataclasses.fields(SamplingConfig)} - {"stop", "stop_at_eos", "history", "seed"}


@register_model("diffutron")
class HarnessModel(LM):
    """Model args: pretrained (folder, adapter folder, hub id, preset:NAME, or a shipped model's name;
    default tiny-diffutron), device, dtype (auto, fp32, bf16, float32, ...: precision.py), batch_size (rows per
    forward), mc_num (Monte Carlo samples per continuation), seed, check_greedy, max_gen_toks, and the sampler's
    settings for generate_until (steps, block_length, policy, temperature, top_k, top_p,
    repetition_penalty, threshold, cfg_scale, schedule, truncate_prompt)."""

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = 32,
        max_batch_size: int | None = None,
        mc_num: int = 128,
        seed: int = 0,
        check_greedy: bool = False,
        max_gen_toks: int = 256,
        trust_remote_code: bool = False,
        lm=None,
        **sampling,
    ) -> None:
        super().__init__()
        unknown = set(sampling) - _sampling_fields()
        if unknown:
            raise UsageError(
                f"unknown model argument(s) for diffutron: {', '.join(sorted(unknown))} "
                f"(known: pretrained, device, dtype, batch_size, mc_num, seed, check_greedy, max_gen_toks, "
                f"{', '.join(sorted(_sampling_fields()))})"
            )
        if lm is None:
            import torch

            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI passes cuda:0 unless told otherwise; its own HF model falls back too
                warnings.warn(f"device {device} asked for, but CUDA is not available: using the CPU", stacklevel=2)
                device = None
            lm = load(pretrained, device, dtype, trust_remote_code)
        self.lm = lm
        self.batch_size = 32 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.mc_num, self.seed = int(mc_num), int(seed)
        self.check_greedy = str(check_greedy).lower() in ("true", "1", "yes")
        self.max_gen_toks = int(max_gen_toks)
        self.sampling = sampling
        from diffutron.sampling import SamplingConfig

        SamplingConfig(**sampling).validate()  # a bad setting fails now, not after the likelihood tasks ran
        if self.batch_size < 1 or self.mc_num < 1 or self.max_gen_toks < 1:
            raise UsageError("batch_size, mc_num and max_gen_toks must be at least 1")
        self._device = lm.device

    @property
    def tokenizer_name(self) -> str:
        return self.lm.name.replace("/", "__")

    def get_model_info(self) -> dict:
        from diffutron.precision import name_of

        return {"model_name": self.lm.name, "dtype": name_of(self.lm.dtype), "mc_num": self.mc_num, "seed": self.seed}

    # -- loglikelihood ------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.lm.tokenizer, *request.args) for request in requests]
        scores = self._score(pairs, "loglikelihood", disable_tqdm, question_keys(requests), self.check_greedy)
        results = [(s.logprob, s.greedy) for s in scores]
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        prefix, suffix = self.lm.special_affixes
        room = self.lm.context_length - len(prefix) - len(suffix)
        windows, owners = [], []
        for i, request in enumerate(requests):
            ids = self.lm.tokenizer(request.args[0], add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids), room):
                windows.append(([], ids[start : start + room]))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, self._score(windows, "loglikelihood_rolling", disable_tqdm), strict=True):
            totals[owner] += score.logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _score(self, pairs, what: str, disable_tqdm: bool, keys=None, check_greedy: bool = False):
        from tqdm import tqdm

        from diffutron.likelihood import continuation_logprobs

        with tqdm(desc=f"diffutron {what} (rows)", disable=disable_tqdm) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            return continuation_logprobs(
                self.lm,
                pairs,
                mc_num=self.mc_num,
                seed=self.seed,
                keys=keys,
                batch_size=self.batch_size,
                check_greedy=check_greedy,
                progress=progress,
            )

    # -- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import normalize_gen_kwargs
        from tqdm import tqdm

        from diffutron.sampling import SamplingConfig

        groups: dict[tuple, list[int]] = {}
        seeds, seen = [], Counter()
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = tuple(s for s in kwargs.get("until") or [] if s)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else None
            settings = (until, int(kwargs["max_gen_toks"]), temperature)
            groups.setdefault(settings, []).append(i)
            content = (context, json.dumps(settings))
            seeds.append(content_seed(self.seed, *content, str(seen[content])))  # repeats: 0, 1, 2, ...
            seen[content] += 1
        out = [""] * len(requests)
        prefix, suffix = self.lm.special_affixes
        longest = self.lm.context_length - len(prefix) - len(suffix) - 1  # at least one prompt token
        with tqdm(total=len(requests), desc="diffutron generate_until", disable=disable_tqdm) as bar:
            for (until, max_gen_toks, temperature), members in groups.items():
                options = {"truncate_prompt": True, **self.sampling}
                if temperature is not None:
                    options["temperature"] = temperature
                new_tokens = min(max_gen_toks, longest)
                block = int(options.get("block_length") or 0)
                if block:  # the sampler needs whole blocks: generate up to the next multiple, keep max_gen_toks
                    new_tokens = min(-(-new_tokens // block) * block, longest // block * block)
                config = SamplingConfig(**options, stop=until)
                for b in range(0, len(members), self.batch_size):
                    chunk = members[b : b + self.batch_size]
                    rows = self._generate(
                        [requests[i].args[0] for i in chunk], [seeds[i] for i in chunk], new_tokens, config
                    )
                    for i, row in zip(chunk, rows, strict=True):
                        text = row.text
                        if len(row.token_ids) > max_gen_toks:
                            text = self.lm.tokenizer.decode(row.token_ids[:max_gen_toks], skip_special_tokens=True)
                        out[i] = cut_at_stops(text, until)
                        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                    bar.update(len(chunk))
        return out

    def _generate(self, prompts: list[str], seeds: list[int], new_tokens: int, config):
        """The sampler on the prompts as one batch, each row drawing with its own seed (rng.py: a row's
        numbers depend on its seed alone); its RowResults in order."""
        from diffutron.sampling import Denoiser, generation_canvas

        denoiser = Denoiser(self.lm, config)
        for key, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
            canvas = generation_canvas(self.lm, [prompt], new_tokens, config.truncate_prompt, config.frame)
            denoiser.add(canvas, dataclasses.replace(config, seed=seed), keys=[key])
        rows = {}
        while len(denoiser):
            rows.update((row.key, row) for row in denoiser.step().finished if row is not None)
        return [rows[key] for key in range(len(prompts))]


def question_keys(requests) -> list[str]:
    """The mask key of each loglikelihood request (likelihood.question_key): the content of its question,
    the requests of one document (lm-eval's task name and doc id group them; a request without them is a
    question of its own)."""
    members: dict[object, list[int]] = {}
    for i, request in enumerate(requests):
        question = (request.task_name, request.doc_id) if request.doc_id is not None else i
        members.setdefault(question, []).append(i)
    keys = [""] * len(requests)
    for group in members.values():
        key = question_key(requests[i].args for i in group)
        for i in group:
            keys[i] = key
    return keys


def cut_at_stops(text: str, stops: Iterable[str]) -> str:
    """The text before the first occurrence of any stop string."""
    end = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:end]


def load(name: str | None, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False):
    """A DiffusionLM from any name diffutron loads (default: the shipped tiny-diffutron), in `dtype` (auto, fp32,
    bf16, float32, bfloat16, float16; None: bf16 on CUDA, else fp32; precision.py)."""
    from diffutron.model import DiffusionLM

    return DiffusionLM.from_pretrained(
        name or "tiny-diffutron", device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )


if __name__ == "__main__":  # lm-eval's own command line, with `diffutron` registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
