"""Passkey retrieval (the LongRoPE / Landmark-attention test) and LongRoPE2 needle samples.

Prompt (the standard one)::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them.
    I will quiz you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.  (x n)
    The pass key is 12345. Remember it. 12345 is the pass key.          <- at a depth
    The grass is green. ...                                              (x m)
    What is the pass key? The pass key is

The prompt is assembled from separately tokenized pieces, so its length in tokens is controlled
exactly (up to one filler sentence). An answer is scored by teacher forcing: it counts as
retrieved iff the greedy choice at each of the answer's digit-carrying token positions is the
answer's token -- the greedy decoding of the 5 digits once the separator (a lone space token in
SmolLM2's tokenizer) is given, in one forward and without a KV cache.
``mode="generate"`` decodes ``max_new_tokens`` tokens with ``model.generate`` instead and parses
the first digit string.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
from typing import Optional, Sequence

import torch

from .. import parallel
from ..config import LongRoPEConfig
from .rope import check_length, use_rope

PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                  "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_KEY = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"

NEEDLE_KEY = " The special magic number is: {key}."
NEEDLE_QUESTION = " What is the special magic number? The special magic number is:"


@dataclasses.dataclass
class PasskeyPrompt:
    input_ids: torch.Tensor  # (n,) the prompt, ending with the question
    answer_ids: torch.Tensor  # (k,) " NNNNN"
    key: str
    depth: float
    key_position: int  # token index where the key sentence starts

    @property
    def length(self) -> int:
        return len(self.input_ids) + len(self.answer_ids) - 1


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def random_key(rng: random.Random, digits: int = 5) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """The passkey prompt whose forward pass (prompt + answer minus its last token) has at most
    ``length`` tokens (and at least ``length`` minus one filler sentence), key sentence at ``depth``
    (0 = right after the instruction, 1 = right before the question)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    prefix, filler = _ids(tokenizer, PASSKEY_PREFIX), _ids(tokenizer, PASSKEY_FILLER)
    key_ids, question = _ids(tokenizer, PASSKEY_KEY.format(key=key)), _ids(tokenizer, PASSKEY_QUESTION)
    answer = _ids(tokenizer, " " + key)
    fixed = len(prefix) + len(key_ids) + len(question) + len(answer) - 1
    n_fill = (length - fixed) // len(filler)
    if n_fill < 1:
        raise ValueError(f"length {length} is too short for a passkey prompt (needs > {fixed + len(filler)} tokens)")
    before = round(depth * n_fill)
    parts = [prefix, filler.repeat(before), key_ids, filler.repeat(n_fill - before), question]
    key_position = len(prefix) + before * len(filler)
    return PasskeyPrompt(torch.cat(parts), answer, key, depth, key_position)


def needle_sample(tokenizer, haystack: torch.Tensor, length: int, depth: float, rng: random.Random,
                  digits: int = 7) -> PasskeyPrompt:
    """LongRoPE2 needle sample: real text (``haystack`` token ids) with a magic-number sentence
    inserted at ``depth`` and the question at the end; ``length`` tokens in all (prompt + answer
    minus its last token)."""
    key = random_key(rng, digits)
    needle, question = _ids(tokenizer, NEEDLE_KEY.format(key=key)), _ids(tokenizer, NEEDLE_QUESTION)
    answer = _ids(tokenizer, " " + key)
    room = length - len(needle) - len(question) - len(answer) + 1
    if room < 1 or len(haystack) < room:
        raise ValueError(f"haystack of {len(haystack)} tokens is too short for a needle sample of {length}")
    text = haystack[:room]
    at = round(depth * room)
    ids = torch.cat([text[:at], needle, text[at:], question])
    return PasskeyPrompt(ids, answer, key, depth, at)


def parse_answer(text: str) -> Optional[str]:
    """The first run of digits in a generated continuation (None if there is none)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


@dataclasses.dataclass
class PasskeyTrial:
    length: int
    depth: float
    key: str
    answer: str
    correct: bool
    answer_nll: float  # mean NLL of the answer tokens (teacher-forced; nan in generate mode)


@torch.inference_mode()
def score_prompt(model, prompt: PasskeyPrompt, tokenizer=None):
    """(greedy answer string, retrieved?, mean answer NLL) by teacher forcing (one forward).

    Only the answer tokens that carry digits are judged: tokenizers such as SmolLM2's split
    " 12345" into a lone space and five digits, and a model that would print a newline or a
    colon before the number has still retrieved it. The judged tokens are exactly the greedy
    decoding of the digits once the separator is given.
    """
    device = next(model.parameters()).device
    ids = torch.cat([prompt.input_ids, prompt.answer_ids[:-1]])[None].to(device)
    k = len(prompt.answer_ids)
    logits = model(input_ids=ids, logits_to_keep=k, use_cache=False).logits[0].float()
    target = prompt.answer_ids.to(device)
    judged = torch.ones(k, dtype=torch.bool, device=device)
    if tokenizer is not None:
        judged = torch.tensor([tokenizer.decode([t]).strip() != "" for t in prompt.answer_ids.tolist()],
                              device=device)
    greedy = logits.argmax(-1)
    nll = float(torch.nn.functional.cross_entropy(logits[judged], target[judged]))
    picked = greedy[judged].tolist()
    text = tokenizer.decode(picked) if tokenizer is not None else " ".join(map(str, picked))
    return text.strip(), bool((greedy[judged] == target[judged]).all()), nll


@torch.inference_mode()
def generate_answer(model, tokenizer, prompt: PasskeyPrompt, max_new_tokens: int = 6) -> str:
    """Greedy-decode ``max_new_tokens`` tokens after the prompt and parse the digits."""
    device = next(model.parameters()).device
    ids = prompt.input_ids[None].to(device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return parse_answer(tokenizer.decode(out[0, ids.shape[1]:].tolist())) or ""


def passkey_retrieval(model, tokenizer, lengths: Sequence[int], depths: Sequence[float] = (0.1, 0.5, 0.9),
                      trials: int = 1, cfg: Optional[LongRoPEConfig] = None, seed: int = 0, mode: str = "score",
                      backend: str = "auto", progress: bool = False, on_trial=None) -> list:
    """Run passkey trials for every (length, depth); returns a list of :class:`PasskeyTrial`.

    Args:
        lengths: prompt lengths in tokens; depths: key positions in [0, 1].
        trials: random keys per (length, depth).
        cfg: RoPE config to run under (None: the model as it is).
        mode: "score" (teacher forcing, one forward) or "generate" (greedy decoding).
        on_trial: called with each PasskeyTrial as it finishes.

    Under ``torchrun`` the (length, depth, trial) items are split over the ranks (see
    :func:`longrope_triton.parallel.imap`); every rank returns the same list.
    """
    if mode not in ("score", "generate"):
        raise ValueError(f"mode must be 'score' or 'generate', got {mode!r}")
    if cfg is not None:
        for n in lengths:
            check_length(cfg, n)
    rng = random.Random(seed)
    jobs = [(n, d, random_key(rng)) for n in lengths for d in depths for _ in range(trials)]

    def run_trial(job) -> PasskeyTrial:
        n, d, key = job
        prompt = passkey_prompt(tokenizer, n, d, key)
        if mode == "score":
            answer, correct, nll = score_prompt(model, prompt, tokenizer)
            return PasskeyTrial(n, d, key, parse_answer(answer) or answer, correct, nll)
        answer = generate_answer(model, tokenizer, prompt)
        return PasskeyTrial(n, d, key, answer, answer == key, float("nan"))

    results = []
    ctx = use_rope(model, cfg, backend) if cfg is not None else contextlib.nullcontext()
    with ctx:
        # the trials are split over the ranks under torchrun; every rank gets all of them, in order
        trials_done = parallel.imap(run_trial, jobs)
        if progress:
            from tqdm.auto import tqdm
            trials_done = tqdm(trials_done, total=len(jobs), desc="passkey", unit="trial", leave=False,
                               dynamic_ncols=True)
        for trial in trials_done:
            results.append(trial)
            if on_trial is not None:
                on_trial(trial)
    return results


def accuracy_table(trials: Sequence[PasskeyTrial]) -> dict:
    """{(length, depth): accuracy} over trials."""
    cells: dict = {}
    for t in trials:
        cells.setdefault((t.length, t.depth), []).append(t.correct)
    return {k: sum(v) / len(v) for k, v in sorted(cells.items())}

