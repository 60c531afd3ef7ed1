"""Gradient-guided paraphrase: token saliency, paraphrasers and the meaning check.

Saliency is the L2 norm, per token, of the gradient of the reward with respect to the input token
embeddings, restricted to the response. The top-k tokens are mapped to the words of the response
that contain them, and a paraphraser rewrites the response around those words. Three paraphrasers:

* :class:`NeighbourParaphraser` (offline, the default): substitutes a salient word with one of its
  nearest neighbours in MiniLM's token-embedding space, one candidate per substitution;
* :class:`ChatCompletionsParaphraser`: any OpenAI-compatible ``/chat/completions`` endpoint;
* :class:`LocalChatParaphraser`: a local Hugging Face causal LM with a chat template.

Every candidate gets a meaning score, the cosine similarity of MiniLM sentence embeddings of the
original response and the candidate (:class:`MeaningScorer`), and is rejected below the threshold.
Responses are stored as turn contents, apart from the role markers, so a rewrite cannot damage the
dialogue's markers. The response's own leading and trailing whitespace is put back after each rewrite.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .data import PreferencePair, Turn
from .registry import _minilm_path

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_REWRITE_TAG = re.compile(r"<rewrite>(.*?)</rewrite>", re.DOTALL)
# A rewrite that adds a dialogue turn of its own would change the conversation, not the response.
_ROLE_MARKER = re.compile(r"(^|\n)\s*(Human|Assistant|USER|ASSISTANT|User|System)\s*:")


def keep_whitespace(original: str, rewritten: str) -> str:
    """Return ``rewritten`` stripped, with the leading and trailing whitespace of ``original`` put back."""
    leading = original[: len(original) - len(original.lstrip())]
    trailing = original[len(original.rstrip()) :]
    return f"{leading}{rewritten.strip()}{trailing}"


# ---------------------------------------------------------------------------------------------
# Saliency


def token_saliency(reward_model, turns: Sequence[Turn]):
    """Return ``(rendered, encoded, saliency)``: the L2 norm of d reward / d embedding per token, zero outside the response.

    The forward runs in float32 without autocast. Gradients are taken with respect to the output
    of the input-embedding module, so the model's parameters are not changed.
    """
    rendered = reward_model.render(turns)
    encoded = reward_model.encode(rendered)
    device = reward_model.device
    input_ids = torch.tensor([encoded.input_ids], device=device)
    attention_mask = torch.ones_like(input_ids)
    position_ids = torch.arange(input_ids.shape[1], device=device).unsqueeze(0)

    captured: dict[str, torch.Tensor] = {}

    def capture(module, inputs, output):
        output = output.detach().float().requires_grad_(True)
        captured["embeddings"] = output
        return output

    handle = reward_model.model.get_input_embeddings().register_forward_hook(capture)
    try:
        with torch.enable_grad():
            reward = reward_model.differentiable_rewards(input_ids, attention_mask, position_ids)[0].float()
            (gradient,) = torch.autograd.grad(reward, captured["embeddings"])
    finally:
        handle.remove()
    saliency = gradient[0].norm(dim=-1).detach().cpu().numpy()
    saliency[~np.array(encoded.response_mask, dtype=bool)] = 0.0
    return rendered, encoded, saliency


def salient_words(reward_model, turns: Sequence[Turn], top_k: int = 5) -> list[str]:
    """Return the words of the response that contain the ``top_k`` most salient tokens, most salient first, without repeats."""
    rendered, encoded, saliency = token_saliency(reward_model, turns)
    words = [
        (match.start(), match.end(), match.group())
        for match in _WORD.finditer(rendered.text, rendered.response_start, rendered.response_end)
    ]
    order = [index for index in np.argsort(-saliency, kind="stable") if saliency[index] > 0][:top_k]
    chosen: list[str] = []
    for index in order:
        start, end = encoded.offsets[index]
        for word_start, word_end, word in words:
            if start < word_end and end > word_start and word not in chosen:
                chosen.append(word)
                break
    return chosen


# ---------------------------------------------------------------------------------------------
# Meaning check


class MeaningScorer:
    """Cosine similarity of sentence embeddings (MiniLM through sentence-transformers)."""

    def __init__(self, model_path: str | None = None, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_path or _minilm_path(), device=device)

    def similarity(self, reference: str, candidates: Sequence[str]) -> np.ndarray:
        if not candidates:
            return np.zeros(0)
        embeddings = self.model.encode([reference, *candidates], normalize_embeddings=True, show_progress_bar=False)
        return embeddings[1:] @ embeddings[0]


# ---------------------------------------------------------------------------------------------
# Paraphrasers


@dataclass(frozen=True)
class RewriteRequest:
    """Input of a paraphraser: the response, the words to reword, and the dialogue before it."""

    response: str
    words: tuple[str, ...]
    side: str  # "chosen" or "rejected"
    context: str = ""


@dataclass(frozen=True)
class Candidate:
    text: str
    log: dict[str, Any] = field(default_factory=dict)


def rewrite_messages(request: RewriteRequest) -> list[dict[str, str]]:
    """Build chat messages that ask a language model to reword a reply without changing its content."""
    system = (
        "You edit assistant replies. You change wording and sentence structure, never the facts, the claims, "
        "the stance or the level of detail."
    )
    user = (
        f"Conversation so far (context only, do not edit):\n<context>\n{request.context.strip()}\n</context>\n\n"
        f"Reply to reword:\n<reply>\n{request.response.strip()}\n</reply>\n\n"
        f"Reword the reply, replacing in particular these words: {', '.join(request.words)}. Keep its meaning "
        "and tone. Answer with the new reply only, between <rewrite> and </rewrite>."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_rewrite(reply: str) -> str | None:
    """Extract the text between ``<rewrite>`` tags; return None when the reply has none or an empty one."""
    match = _REWRITE_TAG.search(reply or "")
    if match is None or not match.group(1).strip():
        return None
    return match.group(1).strip()


# Words whose embedding neighbours are often their opposites ("no" -> "yes"); sentence embeddings
# barely tell such swaps apart, so the offline paraphraser never substitutes to or from them.
POLARITY_WORDS = frozenset(
    "yes no not never always nothing everything nobody everyone none all can cannot cant could couldnt "
    "should shouldnt must will wont would wouldnt do dont does doesnt did didnt is isnt are arent was wasnt "
    "safe unsafe good bad right wrong true false legal illegal allowed forbidden okay fine harmful harmless "
    "agree disagree accept refuse yes yeah nope".split()
)


class NeighbourParaphraser:
    """Offline paraphraser: one candidate per (salient word, nearest-neighbour word) substitution.

    Neighbours are whole-word entries of MiniLM's WordPiece vocabulary, ranked by cosine similarity
    of their input embeddings. Only salient words that are themselves vocabulary entries are replaced.
    NOTE: embedding neighbours can still be antonyms outside ``POLARITY_WORDS``; the meaning check
    (a sentence-embedding cosine) catches some of them, not all.
    """

    name = "neighbours"

    def __init__(self, model_path: str | None = None, *, neighbours: int = 4, max_candidates: int = 12):
        from transformers import AutoModel, AutoTokenizer

        path = model_path or _minilm_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        weights = AutoModel.from_pretrained(path).get_input_embeddings().weight.detach().float()
        vocabulary = tokenizer.get_vocab()
        self._words = [token for token, _ in sorted(vocabulary.items(), key=lambda item: item[1])
                       if token.isalpha() and len(token) > 1 and not token.startswith("##")]
        ids = torch.tensor([vocabulary[token] for token in self._words])
        self._embeddings = torch.nn.functional.normalize(weights[ids], dim=-1)
        self._row = {token: row for row, token in enumerate(self._words)}
        self.neighbours = neighbours
        self.max_candidates = max_candidates

    def nearest(self, word: str) -> list[str]:
        row = self._row.get(word.lower())
        if row is None or word.lower() in POLARITY_WORDS:
            return []
        similarity = self._embeddings @ self._embeddings[row]
        similarity[row] = -1.0
        ranked = torch.topk(similarity, self.neighbours + len(POLARITY_WORDS)).indices.tolist()
        return [self._words[index] for index in ranked if self._words[index] not in POLARITY_WORDS][: self.neighbours]

    def rewrite(self, request: RewriteRequest) -> list[Candidate]:
        candidates = []
        for word in request.words:
            pattern = re.compile(rf"\b{re.escape(word)}\b")
            if not pattern.search(request.response):
                continue
            for neighbour in self.nearest(word):
                replacement = neighbour.capitalize() if word[:1].isupper() else neighbour
                text = pattern.sub(replacement, request.response, count=1)
                candidates.append(Candidate(text, {"backend": self.name, "substitution": [word, replacement]}))
                if len(candidates) >= self.max_candidates:
                    return candidates
        return candidates


class ChatCompletionsParaphraser:
    """Paraphraser behind an OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint.

    ``model``, ``base_url`` and ``api_key`` default to ``$RMSAE_PARAPHRASE_MODEL`` (else ``gpt-4o``),
    ``$OPENAI_BASE_URL`` (else ``https://api.openai.com/v1``) and ``$OPENAI_API_KEY``. A failed call
    is retried after ``backoff * attempt`` seconds, a reply without ``<rewrite>`` tags at once; after
    ``max_retries`` attempts the unchanged response is returned, marked ``fallback``. Each raw reply
    and its token usage are logged and kept in the candidate's log.
    """

    name = "openai"

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        temperature: float = 0.7,
        max_tokens: int = 512,
        max_retries: int = 3,
        backoff: float = 2.0,
        timeout: float = 60.0,
    ):
        self.model = model or os.environ.get("RMSAE_PARAPHRASE_MODEL", "gpt-4o")
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")).rstrip("/")
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not self.api_key:
            raise ValueError("The chat-completions paraphraser needs an API key: set OPENAI_API_KEY or pass api_key.")
        if max_retries < 1:
            raise ValueError(f"max_retries must be at least 1, got {max_retries!r}.")
        self.temperature, self.max_tokens = temperature, max_tokens
        self.max_retries, self.backoff, self.timeout = max_retries, backoff, timeout

    def _post(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions", data=body, method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"},
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode())

    def rewrite(self, request: RewriteRequest) -> list[Candidate]:
        messages = rewrite_messages(request)
        attempts: list[dict[str, Any]] = []
        for attempt in range(1, self.max_retries + 1):
            try:
                reply = self._post(messages)
                content = reply["choices"][0]["message"]["content"]
            except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError, TypeError) as error:
                logger.warning("Paraphrase call %d/%d to %s failed: %s", attempt, self.max_retries, self.base_url, error)
                attempts.append({"attempt": attempt, "error": f"{type(error).__name__}: {error}"})
                if attempt < self.max_retries:
                    time.sleep(self.backoff * attempt)
                continue
            usage = reply.get("usage")
            logger.info("Paraphrase reply (attempt %d, usage %s): %r", attempt, usage, content)
            attempts.append({"attempt": attempt, "raw_reply": content, "usage": usage})
            parsed = parse_rewrite(content)
            if parsed is not None:
                return [Candidate(keep_whitespace(request.response, parsed), {"backend": self.name, "model": self.model, "attempts": attempts})]
            logger.warning("Paraphrase reply %d/%d has no <rewrite> tags.", attempt, self.max_retries)
        logger.warning("No usable paraphrase after %d attempts; keeping the response unchanged.", self.max_retries)
        return [Candidate(request.response, {"backend": self.name, "model": self.model, "fallback": True, "attempts": attempts})]


class LocalChatParaphraser:
    """Paraphraser that samples from a local Hugging Face causal LM through its chat template."""

    name = "local"

    def __init__(self, model_path: str, *, temperature: float = 0.7, max_new_tokens: int = 512,
                 device: str = "cpu", seed: int = 0, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"The tokenizer of {model_path} has no chat template; the local paraphraser needs one.")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code).to(device).eval()
        self.model_path, self.device = model_path, device
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed

    @torch.no_grad()
    def rewrite(self, request: RewriteRequest) -> list[Candidate]:
        prompt = self.tokenizer.apply_chat_template(rewrite_messages(request), add_generation_prompt=True, return_tensors="pt", return_dict=True)
        prompt = {key: value.to(self.device) for key, value in prompt.items()}
        torch.manual_seed(self.seed)
        output = self.model.generate(**prompt, do_sample=True, temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                                     pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        content = self.tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        logger.info("Local paraphrase reply: %r", content)
        parsed = parse_rewrite(content)
        log = {"backend": self.name, "model": self.model_path, "raw_reply": content}
        if parsed is None:
            return [Candidate(request.response, {**log, "fallback": True})]
        return [Candidate(keep_whitespace(request.response, parsed), log)]


def make_paraphraser(name: str, **options: Any):
    """Build a paraphraser by name: ``neighbours``, ``openai`` or ``local`` (``model_path`` required)."""
    if name == "neighbours":
        return NeighbourParaphraser(**options)
    if name == "openai":
        return ChatCompletionsParaphraser(**options)
    if name == "local":
        return LocalChatParaphraser(**options)
    raise ValueError(f"Unknown paraphraser {name!r}; expected neighbours, openai or local.")


# ---------------------------------------------------------------------------------------------
# The gradient method


def _first_pair_rewards(scores) -> dict[str, float]:
    from .perturb import pair_rewards

    return pair_rewards(scores.reward_chosen[0], scores.reward_rejected[0])


def _replace_side(pair: PreferencePair, side: str, text: str) -> PreferencePair:
    chosen, rejected = (text, pair.rejected) if side == "chosen" else (pair.chosen, text)
    return PreferencePair(pair.prompt, chosen, rejected, pair.source, pair.metadata)


def gradient_paraphrase_record(reward_model, pair: PreferencePair, settings, paraphraser, meaning, common: dict[str, Any]) -> dict[str, Any]:
    """Run the gradient-guided paraphrase on one pair; return its record (see :func:`rmsae.perturb.make_record`).

    Each step rewrites the chosen response (to lower its reward) and the rejected one (to raise
    it). Among the candidates that pass the meaning check, the one that moves the reward furthest
    in that direction is kept. The loop stops when the reward gap falls to ``target_threshold``;
    a pair already there is recorded unchanged.
    """
    from .perturb import make_record

    initial = _first_pair_rewards(reward_model.score_pairs([pair], progress=False))
    history: list[dict[str, Any]] = [{"step": "initial", "chosen_reward": initial["chosen"], "rejected_reward": initial["rejected"],
                                      "diff": initial["diff"], "suffix_chosen": pair.chosen, "suffix_rejected": pair.rejected}]
    current, final = pair, initial
    context = "\n".join(f"{turn.role}: {turn.content}" for turn in pair.prompt)
    # A pair already ranked at or below the threshold needs no edit: it is recorded unchanged.
    steps = settings.steps if initial["diff"] > settings.target_threshold else 0
    for step in range(1, steps + 1):
        entry: dict[str, Any] = {"step": step}
        for side in ("chosen", "rejected"):
            words = salient_words(reward_model, current.conversation(side), settings.top_k)
            entry[f"salient_words_{side}"] = words
            if not words:
                continue
            response = getattr(current, side)
            candidates = [c for c in paraphraser.rewrite(RewriteRequest(response, tuple(words), side, context)) if c.text.strip()]
            scores = meaning.similarity(getattr(pair, side), [c.text for c in candidates])
            with_markers = {id(c) for c in candidates if _ROLE_MARKER.search(c.text) and not _ROLE_MARKER.search(response)}
            accepted = [
                c for c, score in zip(candidates, scores)
                if score >= settings.meaning_threshold and c.text != response and id(c) not in with_markers
            ]
            entry[f"candidates_{side}"] = [
                {"text": c.text, "meaning": float(score), "accepted": c in accepted,
                 **({"rejected_for": "role marker"} if id(c) in with_markers else {}), **c.log}
                for c, score in zip(candidates, scores)
            ]
            if not accepted:
                continue
            rewards = reward_model.score_conversations(
                [pair.prompt + (Turn("assistant", c.text),) for c in accepted], batch_size=settings.batch_size, progress=False
            ).rewards
            best = int(np.argmin(rewards)) if side == "chosen" else int(np.argmax(rewards))
            # Greedy: keep a rewrite only if it moves this side's reward the right way, so the
            # search cannot swap a word back and forth between steps.
            improves = rewards[best] < final["chosen"] if side == "chosen" else rewards[best] > final["rejected"]
            entry[f"improved_{side}"] = bool(improves)
            if settings.require_improvement and not improves:
                continue
            current = _replace_side(current, side, accepted[best].text)
            entry[f"suffix_{side}"] = accepted[best].text
        final = _first_pair_rewards(reward_model.score_pairs([current], progress=False))
        entry.update(chosen_reward=final["chosen"], rejected_reward=final["rejected"], diff=final["diff"])
        history.append(entry)
        logger.debug("%s step %d: reward gap %.4f", pair.case_id, step, final["diff"])
        if final["diff"] <= settings.target_threshold:
            break
    return make_record(pair, current, initial, final, history, "gradient", **common)
