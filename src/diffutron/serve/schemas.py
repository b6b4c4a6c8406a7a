"""Request bodies of the HTTP API: OpenAI's fields where they exist, diffusion settings as extra fields.

Every sampling setting goes through `diffutron.sampling.user_config`, the mapping the CLI uses: no
default or range check of a sampling setting lives here. What is here: the shape of a request,
the server's own limits (sizes that keep one request from stalling the others), and OpenAI fields
that have no meaning for a diffusion model, refused with a reason instead of ignored.
"""

from __future__ import annotations

import typing
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic_core import PydanticCustomError

from diffutron.errors import UsageError
from diffutron.mask_syntax import SPAN
from diffutron.sampling import SamplingConfig, user_config
from diffutron.sampling.config import FIELDS, MAX_NEW_TOKENS, MAX_SEED

DEFAULT_MAX_TOKENS = MAX_NEW_TOKENS  # max_tokens when a request leaves it out, as in generate() and the CLI
MAX_STOPS, MAX_STOP_CHARS = 16, 200
# Scoring runs on the engine's thread between two denoising steps: running generations wait for it.
# These caps keep the wait to a few seconds on a CPU with the shipped model.
MAX_SCORE_CHARS, MAX_SCORE_SAMPLES, MAX_ELBO_SAMPLES = 10_000, 8, 64
MAX_FILL_MASK_TOP_K = 100
# masks x top_k: each candidate is a row of the answer (and, with sequences, a decoded copy of the text)
MAX_FILL_MASK_CANDIDATES = 1_000
# <word> blanks x lengths x beam: the chains a word fill follows, each a row of each step's forward (and
# its scoring). The default (one <word>, 4 lengths, beam 8) is 32.
MAX_WORD_WORK, MAX_WORD_BEAM = 64, 32
# One rule for every seed of the API: the sampler's generators are int64 (sampling/rng.py)
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class BadRequest(UsageError):
    """A request the server refuses (HTTP 400), naming the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def one_or_more(value: str | list[str], field: str) -> list[str]:
    """A field that takes a string or a list of them, as a non-empty list."""
    values = [value] if isinstance(value, str) else value
    if not values:
        raise BadRequest(f"{field} is an empty list", field)
    return values


def longest_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: the longest entry of the vocabulary. A byte-level
    BPE entry (ModernBERT's, the shipped model's) has one character per byte of the text it stands for,
    a SentencePiece entry one per character (a byte-fallback `<0x..>` six for one byte): never fewer
    characters than it covers. Added tokens (`[MASK]`) are in the vocabulary under their own text."""
    return max(map(len, tokenizer.get_vocab()))


def check_fits(texts: list[str], max_chars: int, context: int, param: str) -> None:
    """Refuse, before any tokenising (on the engine thread, where it would stall every running request),
    a text that cannot fit the context whatever its tokens: over `max_chars` = context x the longest
    token's characters, it has more than `context` tokens. `<mask*N>` placeholders are not counted (they
    are masks, counted apart). Holds for tokenizers whose tokens cover every character of the text (BPE,
    SentencePiece); one whose normaliser drops characters or that writes one [UNK] for a whole unknown
    word could fit a longer text, which is refused all the same."""
    for text in texts:
        chars = len(SPAN.sub("", text)) if "<" in text else len(text)
        if chars > max_chars:
            raise BadRequest(
                f"{param} is {chars:,} characters long: more than the model's context of {context} tokens can "
                f"hold (at most {max_chars:,} characters with this tokenizer)",
                param,
            )


def check_steps(steps: int | None, tokens: int, what: str) -> None:
    """More steps than tokens to reveal would only add steps that reveal nothing, while holding a row of
    the batch: refused."""
    if steps is not None and steps > tokens:
        raise BadRequest(f"steps ({steps}) is more than {what} ({tokens}): a step would reveal nothing", "steps")


class Body(BaseModel):
    # unknown fields are refused (a misspelt `stpes` must not silently fall back to the default);
    # strict: no "0.5" for a number, no true for a count
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _unicode_only(cls, data):
        """JSON may carry a lone surrogate (`"\\ud800"`), which is no text: the tokenizer, or the UTF-8 of an
        answer quoting it, would fail on it later. Refused here, for every string and key of the body."""
        found = lone_surrogate(data)
        if found is not None:
            what, field, char = found
            raise PydanticCustomError(
                "lone_surrogate",
                "{what} is not valid Unicode: it holds a lone surrogate ({char})",
                {"what": what, "field": field or None, "char": char},
            )
        return data


class SamplingFields(Body):
    """Request fields named as SamplingConfig's settings (`temperature`, `top_p`, `seed` are also OpenAI's)."""

    def sampling_config(self, mode: str, **more) -> SamplingConfig:
        given = {name: getattr(self, name) for name in type(self).model_fields if name in SETTINGS - _NOT_FIELDS}
        return user_config(mode, **given, **more)


# Every setting of SamplingConfig is a request field of the same name (a new sampler setting is served
# as it appears), except: `stop` and `stop_at_eos` (OpenAI's `stop`, a string or a list, and vLLM's
# `ignore_eos`), `history` (not a request's business), and for infill the generation canvas's own.
SETTINGS = set(FIELDS)
_HINTS = typing.get_type_hints(SamplingConfig)
_NOT_FIELDS = {"stop", "stop_at_eos", "history"}
_GENERATION_ONLY = {"block_length", "frame", "ban_eos", "truncate_prompt"}


_TYPES = {"seed": Seed}  # request fields held to the API's own rule, before user_config's


def _settings(leave_out: set[str]) -> dict:
    return {name: (_TYPES.get(name, _HINTS[name]) | None, None) for name in FIELDS if name not in leave_out}


GenerationSampling = create_model("GenerationSampling", __base__=SamplingFields, **_settings(_NOT_FIELDS))
InfillSampling = create_model("InfillSampling", __base__=SamplingFields, **_settings(_NOT_FIELDS | _GENERATION_ONLY))


class StreamOptions(Body):
    include_usage: bool = False


class Generation(GenerationSampling):
    """What completions and chat completions share."""

    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None  # vLLM's name: do not end the text at the end-of-sequence token
    stream_canvas: bool = False  # with stream: a `diffutron.step` event per step with the whole canvas
    user: str | None = None
    # OpenAI fields without a diffusion meaning: accepted only at their neutral value
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def generation_config(self) -> SamplingConfig:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise BadRequest(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters", "stop")
        eos = None if self.ignore_eos is None else not self.ignore_eos
        return self.sampling_config("generate", stop=stops or None, stop_at_eos=eos)

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise BadRequest(f"{name} is not supported; use repetition_penalty (CTRL's, 1 is off)", name)
        if self.logit_bias:
            raise BadRequest("logit_bias is not supported", "logit_bias")
        if self.stream_canvas and not self.stream:
            raise BadRequest("stream_canvas needs stream: true", "stream_canvas")


NO_LOGPROBS = (
    "logprobs is not supported: a diffusion model reveals tokens in any order, so a token has no "
    "left-to-right probability; POST /v1/score gives the likelihood of a text"
)


class CompletionRequest(Generation):
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs is not None:
            raise BadRequest(NO_LOGPROBS, "logprobs")
        if self.echo:
            raise BadRequest("echo is not supported", "echo")
        if self.suffix is not None:
            raise BadRequest("suffix is not supported: POST /v1/infill fills <mask*N> between any two texts", "suffix")
        if self.best_of not in (None, 1):
            raise BadRequest("best_of is not supported", "best_of")

    def prompts(self) -> list[str]:
        return one_or_more(self.prompt, "prompt")


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs or self.top_logprobs is not None:
            raise BadRequest(NO_LOGPROBS, "logprobs")

    def rendered_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class InfillRequest(InfillSampling):
    text: str | list[str]  # with <mask> (one token) / <mask*N> (N tokens) / one <mask*?> or <mask*A-B>
    stream: bool = False  # a `diffutron.step` event per step, then the result

    def texts(self) -> list[str]:
        return one_or_more(self.text, "text")

    def check_unknown_lengths(self, rows: int, max_batch: int) -> None:
        """A span of unknown length is a row per length, scored once all are filled: no stream, and rows
        within --max-batch."""
        if self.stream:
            raise BadRequest(
                "stream is not available with a span of unknown length (<mask*?>, <mask*A-B>): its lengths are "
                "filled side by side and compared once all are done",
                "stream",
            )
        if rows > max_batch:
            raise BadRequest(
                f"the request asks for {rows} rows (a row per text, and per length of a <mask*?> / <mask*A-B>), "
                f"more than --max-batch {max_batch}",
                "text",
            )


class FillMaskRequest(Body):
    text: str
    top_k: int | None = Field(None, ge=1, le=MAX_FILL_MASK_TOP_K)
    # each candidate's `sequence` (the text with it in place): by default only for a text with one mask
    sequences: bool | None = None

    max_tokens: int | None = Field(None, ge=1)  # <word>: the longest word tried, in tokens
    beam: int | None = Field(None, ge=1, le=MAX_WORD_BEAM)  # <word>: the chains kept per length

    def check_words(self, words: int, lengths: int, beam: int) -> None:
        if words * lengths * beam > MAX_WORD_WORK:
            raise BadRequest(
                f"the text has {words} <word> blanks: with {lengths} lengths and beam {beam} that is "
                f"{words * lengths * beam:,} chains to follow, more than {MAX_WORD_WORK} (fewer <word>, a smaller "
                "max_tokens or beam)",
                "beam" if self.beam is not None else "max_tokens" if self.max_tokens is not None else "text",
            )

    def check_candidates(self, masks: int, top_k: int) -> None:
        if masks * top_k > MAX_FILL_MASK_CANDIDATES:
            raise BadRequest(
                f"the text has {masks} masks: with top_k {top_k} that is {masks * top_k:,} candidates, more than "
                f"{MAX_FILL_MASK_CANDIDATES:,} (fewer masks or a smaller top_k)",
                "top_k" if self.top_k is not None else "text",
            )


class ScoreRequest(Body):
    text: str | list[str]
    mask_ratio: float | None = None  # the PPL's mask ratio [default: evaluate's]
    samples: int | None = Field(None, ge=1, le=MAX_SCORE_SAMPLES)  # passes with fresh masks; 2+ give a standard error
    elbo_samples: int | None = Field(None, ge=0, le=MAX_ELBO_SAMPLES)  # strata of the ELBO bound; 0 skips it
    seed: Seed | None = None

    def texts(self) -> list[str]:
        texts = one_or_more(self.text, "text")
        if not any(t.strip() for t in texts):
            raise BadRequest("nothing to score: give text", "text")
        if sum(len(t) for t in texts) > MAX_SCORE_CHARS:
            raise BadRequest(f"at most {MAX_SCORE_CHARS:,} characters per scoring request", "text")
        return texts

    def options(self) -> dict:
        """The given options of `evaluate` (the others keep evaluate's defaults)."""
        return {k: v for k in ("mask_ratio", "samples", "elbo_samples", "seed") if (v := getattr(self, k)) is not None}


def lone_surrogate(value, where: str = "") -> tuple[str, str, str] | None:
    """The first string or key of a parsed JSON value with a lone surrogate: (what it is, its dotted
    place, the surrogate escaped), or None."""
    if isinstance(value, str):
        return None if (char := _surrogate(value)) is None else (where or "body", where, char)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and (char := _surrogate(key)) is not None:
            return f"a field name in {where or 'the body'}", where, char
        if (found := lone_surrogate(item, f"{where}.{key}" if where else str(key))) is not None:
            return found
    return None


def _surrogate(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return text[error.start].encode("unicode_escape").decode()
    return None
