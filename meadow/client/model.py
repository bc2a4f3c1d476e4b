"""The client's model: embeddings, final norm and LM head run here; every transformer block runs on the swarm.

`DistributedModelForCausalLM` is a transformers `PreTrainedModel` + `GenerationMixin`, so `generate` is
transformers' own loop (greedy, sampling, logits processors, stopping criteria, streamers). What differs is
the KV cache: it lives on the servers, inside an inference session. transformers' cache objects are not used
at all (`_supports_default_dynamic_cache` is False); instead `prepare_inputs_for_generation` hands `forward`
the whole sequence every step, and `forward` sends the servers only the tokens they have not processed yet.
That one rule also gives chats: inside `with model.inference_session(...)`, each `generate` call gets the
whole conversation and only its new suffix travels.

Speculative decoding (`prompt_lookup_num_tokens=K` or `assistant_model=...`) is transformers' assisted generation
too: it needs a cache it can crop, so generate hands it a `RemoteCache`, whose `crop` rewinds the session; the
servers drop the rejected drafts when the next step arrives at the earlier position.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from meadow.client.local_blocks import LocalBlocks, LocalSession
from meadow.client.tuning import ClientLora, PromptTuning, RemoteTuning
from meadow.models import load_blocks, load_client_parts, load_config, load_hf_config, resolve_model_path

DEFAULT_NEW_TOKENS = 20  # what transformers generates when neither max_new_tokens nor max_length is set

# The active inference session of each model, per thread (and per asyncio task): one model object serves many
# requests at once (a web server's handlers), and `with model.inference_session()` in one must not touch another.
# Each change sets a new mapping: a context copied into a task or thread (asyncio.to_thread) sees the sessions active
# when it was copied, and what it opens itself stays its own.
_active_sessions: ContextVar[Mapping[int, "GenerationSession"]] = ContextVar("meadow_sessions", default=MappingProxyType({}))


class NewTokens(NamedTuple):
    """The tokens of a whole sequence (B, L) that the servers have not processed yet: their ids, rotary positions and
    key mask, each (B, L - position); and the whole sequence's ids and bool mask, what the servers hold after them."""

    ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    all_ids: torch.Tensor
    all_mask: torch.Tensor


class GenerationSession:
    """A server-side inference session seen from the model: the remote session plus the token ids
    (and attention mask) the servers have processed, so that each call sends only what is new."""

    def __init__(
        self,
        sequence,
        max_length: int,
        batch_size: int | None,
        prefix: torch.Tensor | None = None,
        tuning: RemoteTuning | None = None,
        local_blocks: LocalBlocks | None = None,
        give_up: threading.Event | None = None,
    ):
        self.sequence, self.max_length, self.batch_size = sequence, max_length, batch_size
        self.most: int | None = None  # see make_room
        self.give_up = give_up  # see InferenceSession
        self.prefix = prefix  # (P, H) trained prompt embeddings that go before the first token, if any
        self.tuning = tuning  # deep prompts and LoRA weights the servers apply for the whole session
        self.local_blocks = local_blocks  # the first blocks, run here, if the user asked for local_blocks
        self.remote = None  # the sequence's InferenceSession, opened at the first step (when the batch size is known)
        self.local: LocalSession | None = None  # the local blocks' KV caches, opened with `remote`
        self.token_ids: torch.Tensor | None = None  # (B, position) ids the servers have processed
        self.mask: torch.Tensor | None = None  # (B, position) bool, their attention mask
        # for stats: steps sent to the servers, their tokens (per row), and tokens rewound (rejected drafts)
        self.steps = self.sent = self.dropped = 0

    @property
    def waiting_for_room(self) -> str | None:
        """Why the servers do not hold the session yet, while every one that could is full (it waits for room)."""
        return self.remote.waiting_for_room if self.remote is not None else None

    @property
    def replayed(self) -> int:
        """Tokens (per row) sent to servers again to rebuild their caches (a server failed, or closed the session)."""
        return self.remote.replayed if self.remote is not None else 0

    @property
    def position(self) -> int:
        """How many tokens (per row) the servers hold in their KV caches."""
        return 0 if self.token_ids is None else self.token_ids.shape[1]

    def split_new(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> NewTokens:
        """Check that the whole sequence `input_ids` (B, L) continues what the servers have processed and
        return its new tokens (B, L - position). Every torch op here runs once per generated token, with cold caches
        (~30 us each): none is spent on what a Python check can skip."""
        batch, length = input_ids.shape
        seen = self.position
        expected_batch = self.batch_size if self.token_ids is None else self.token_ids.shape[0]
        if expected_batch is not None and batch != expected_batch:
            raise ValueError(f"this inference session is for batch size {expected_batch}, got a batch of {batch}")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        if length <= seen or (seen and not torch.equal(input_ids[:, :seen], _on(self.token_ids, input_ids.device))):
            raise ValueError(
                f"input_ids (length {length}) do not extend this inference session: the servers have processed "
                f"{seen} tokens, and input_ids must be those same tokens followed by at least one new token. Pass "
                "the whole conversation so far (e.g. the previous generate output plus the new text), or open a new "
                "session."
            )
        if seen and not torch.equal(mask[:, :seen], _on(self.mask, mask.device)):
            raise ValueError("attention_mask disagrees with the mask of the tokens this session has processed")
        if position_ids is None:
            position_ids = positions_from_mask(mask)
        if position_ids.shape[-1] == length:
            position_ids = position_ids[..., seen:]
        elif position_ids.shape[-1] != length - seen:
            raise ValueError(f"position_ids must cover all {length} tokens or the {length - seen} new ones")
        if position_ids.dim() == 1 or position_ids.shape[0] != batch:
            position_ids = position_ids.expand(batch, -1)
        if self.prefix_length:
            position_ids = position_ids + self.prefix_length
        return NewTokens(input_ids[:, seen:], position_ids, mask[:, seen:], input_ids, mask)

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[0]

    def step(self, hidden: torch.Tensor, new: NewTokens) -> torch.Tensor:
        """Run the new tokens' hidden states (B, T, H) through the blocks (the local ones first, if any, then the
        servers'); remember the tokens once they are stored."""
        if self.remote is None:
            batch_size = self.batch_size or hidden.shape[0]
            length = self.max_length + self.prefix_length
            self.remote = self.sequence.inference_session(length, batch_size, self.tuning, self.give_up)
            self.remote.most = None if self.most is None else self.most + self.prefix_length
            if self.local_blocks is not None:
                self.local = self.local_blocks.session(batch_size, length)
        if self.position == 0 and self.prefix is not None:  # the trained prompt goes first, once
            hidden, position_ids, remote_mask = with_prefix(self.prefix, hidden, new.position_ids, new.mask)
            output = self._through_blocks(hidden, position_ids, remote_mask)[:, self.prefix_length :]
        else:
            output = self._through_blocks(hidden, new.position_ids, new.mask)
        self.steps, self.sent = self.steps + 1, self.sent + new.ids.shape[1]
        # the whole sequence, checked by split_new to extend what was stored: no copy of it grows token by token, but
        # this one is ours (a caller may reuse its tensor in place; a few kB, ~2 us)
        self.token_ids, self.mask = new.all_ids.clone(), new.all_mask.clone()
        return output

    def rewind(self, position: int) -> None:
        """Forget the tokens from `position` on (drafts rejected by speculative decoding); the next step goes there."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to position {position}: the servers hold {self.position} tokens of this session")
        if self.remote is not None:
            self.remote.rewind(position + self.prefix_length if position else 0)  # rewound to 0, the prefix goes again
        self.dropped += self.position - position
        self.token_ids, self.mask = self.token_ids[:, :position], self.mask[:, :position]
        if position == 0:
            self.token_ids = self.mask = None

    def make_room(self, max_length: int, most: int | None = None) -> None:
        """Let the session hold `max_length` tokens per row (at least): the servers grow it with the next step. `most`:
        the most it will hold for what comes (the prompt and the longest reply), which its growth asks no more than."""
        self.max_length, self.most = max(self.max_length, max_length), most
        if self.remote is not None:
            self.remote.max_length = max(self.remote.max_length, max_length + self.prefix_length)
            self.remote.most = None if most is None else max(most, max_length) + self.prefix_length

    def hand_over(self, give_up: threading.Event | None) -> None:
        """The session goes on for someone else (the next request of a conversation an API kept it for): whether
        anybody still waits for it is now told by their `give_up`."""
        self.give_up = give_up
        if self.remote is not None:
            self.remote.give_up = give_up

    def _through_blocks(self, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.local is not None:
            start = 0 if self.position == 0 else self.position + self.prefix_length
            hidden = self.local.step(hidden, position_ids, mask, start)
        return self.remote.step(hidden, position_ids, mask)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote = None


class RemoteCache:
    """What transformers' assisted generation sees of the servers' KV cache: its length, and `crop`, which rewinds the
    session past rejected drafts. It holds no tensors."""

    is_croppable, is_compileable = True, False

    def __init__(self, session: GenerationSession):
        self.session = session

    @property
    def is_linear(self) -> list[bool]:
        return [False]  # plain attention layers: transformers may slice inputs by our length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

    def activate_past_recording(self) -> None:
        pass  # the servers keep every token until it is rewound

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove tokens (transformers passes a negative count; 0 drops nothing)."""
        if tokens_to_remove > 0:
            raise ValueError("RemoteCache.crop takes a negative count of tokens to remove")
        if tokens_to_remove:
            self.session.rewind(self.session.position + tokens_to_remove)


class DistributedPreTrainedModel(PreTrainedModel):
    """What every Meadow model holds on the client: the HF config, the embeddings, the final norm, the remote
    sequence of blocks (no block weights), and what the client trains for those blocks: prompts, its own LoRA."""

    config_class = PreTrainedConfig
    main_input_name = "input_ids"
    base_model_prefix = ""

    def __init__(self, config: PreTrainedConfig, parts, sequence, prompts: PromptTuning | None = None, lora: ClientLora | None = None):
        super().__init__(config)
        self.embed_tokens: nn.Embedding = parts.embed_tokens
        self.norm: nn.Module = parts.norm
        self.embed_norm: nn.Module | None = parts.embed_norm  # BLOOM's word_embeddings_layernorm; most have none
        self.sequence = sequence  # RemoteSequence (or a stand-in with the same interface), not an nn.Module
        self.prompts = prompts  # "ptune" / "deep_ptune": trainable prompts, or None
        self.lora = lora  # the client's own trainable LoRA weights for the remote blocks, or None
        self.local_blocks: LocalBlocks | None = None  # the first blocks, if the client runs them (local_blocks=N)
        self.all_tied_weights_keys = {}  # what post_init would set; post_init itself would re-initialise weights
        self.eval()

    def close(self) -> None:
        """Leave the swarm: stop this client's DHT process and p2p daemon. Closing again does nothing; a closed
        model raises a clear error when it is used."""
        self.sequence.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def first_block_input(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Token embeddings (or inputs_embeds) as the first block takes them: through the embedding norm, if any."""
        return embeddings if self.embed_norm is None else self.embed_norm(embeddings)

    def remote_tuning(self) -> RemoteTuning:
        """The deep prompts and LoRA weights the servers apply, as differentiable tensors."""
        tuning = self.lora.remote_tuning() if self.lora is not None else RemoteTuning()
        if self.prompts is not None and self.prompts.deep is not None:
            tuning = tuning.with_tensors(self.prompts.deep, tuning.lora_flat)
        return tuning

    def remote_hidden(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The last block's output (B, L, H) for the given tokens: one full pass over the swarm, no cache, with
        the trained prompt in front (and cut off again). Differentiable through the servers."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.first_block_input(self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)
        key_mask = attention_mask.bool() if attention_mask is not None else None
        batch, length = hidden.shape[:2]
        if position_ids is None and key_mask is None:
            position_ids = torch.arange(length, device=hidden.device)
        elif position_ids is None:
            position_ids = positions_from_mask(key_mask)
        position_ids = position_ids.expand(batch, length)
        if self.prompts is not None:
            if key_mask is None:
                key_mask = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
            hidden, position_ids, key_mask = with_prefix(self.prompts.prefix, hidden, position_ids + self.prompts.length, key_mask)
        if self.local_blocks is not None:
            hidden = self.local_blocks(hidden, position_ids, key_mask)
        hidden = self.sequence.forward(hidden, position_ids, key_mask, self.remote_tuning())
        prefix_length = 0 if self.prompts is None else self.prompts.length
        return hidden[:, prefix_length:]


class DistributedModelForCausalLM(DistributedPreTrainedModel, GenerationMixin):
    """A causal LM whose blocks run on the swarm: adds the LM head and generation with server-side KV caches."""

    # Beam search needs to reorder the KV cache, which lives on the servers; assisted decoding rolls it back (rewind).
    _supported_generation_modes = [GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.ASSISTED_GENERATION]

    def __init__(self, config: PreTrainedConfig, parts, sequence, prompts: PromptTuning | None = None, lora: ClientLora | None = None):
        super().__init__(config, parts, sequence, prompts, lora)
        self.lm_head: nn.Linear = parts.lm_head

    @property
    def session(self) -> GenerationSession | None:
        """This thread's (or asyncio task's) active inference session on this model, if any."""
        return _active_sessions.get().get(id(self))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the KV cache is server-side: generate must not build a DynamicCache

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        cache: RemoteCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits for `input_ids` (B, L). Outside an inference session: one full pass over the swarm, logits
        (B, L, V), differentiable (loss.backward() reaches through the servers). Inside one (and unless
        use_cache=False): `input_ids` is the whole sequence so far, only the tokens the servers have not
        processed are sent, and the logits cover those new tokens only."""
        if past_key_values is not None or (cache is not None and not isinstance(cache, RemoteCache)):
            raise ValueError("Meadow keeps the KV cache on the servers: use `with model.inference_session(...)`")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        session = self.session if use_cache is not False else None
        if session is not None:
            if input_ids is None:
                raise NotImplementedError("inputs_embeds inside an inference session are not supported yet")
            if labels is not None:
                raise ValueError("labels inside an inference session are not supported: compute the loss without one")
            new = session.split_new(input_ids, attention_mask, position_ids)
            hidden = session.step(self.first_block_input(self.embed_tokens(new.ids)), new)
        else:
            hidden = self.remote_hidden(input_ids, inputs_embeds, attention_mask, position_ids)
        hidden = _on(hidden, self.lm_head.weight.device)

        if not isinstance(logits_to_keep, int):
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep and logits_to_keep < hidden.shape[1]:  # a decoding step's one token: no slicing op
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(self.norm(hidden))
        loss = None
        if labels is not None:
            extra = {"num_items_in_batch": kwargs["num_items_in_batch"]} if "num_items_in_batch" in kwargs else {}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **extra)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if session is not None else None)
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | None = None,
        cache: RemoteCache | None = None,
        **unused,
    ) -> dict:
        """Every step gets the WHOLE sequence (no slicing to the last token as transformers does for its
        caches): `forward` knows from the session which suffix the servers still need."""
        device = self.embed_tokens.weight.device  # as transformers does: inputs may live elsewhere
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        inputs = {name: None if value is None else _on(value, device) for name, value in inputs.items()}
        inputs["use_cache"], inputs["cache"] = use_cache, cache
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    @contextmanager
    def inference_session(
        self, max_length: int, batch_size: int | None = 1, give_up: threading.Event | None = None
    ) -> Iterator[GenerationSession]:
        """Keep a KV cache of up to `max_length` tokens per row on the servers (batch_size None: that of the
        first step). Inside, forward and generate continue it: several generate calls, each given the whole
        conversation so far, make one chat. Once `give_up` is set (nobody waits for the answer any more), a server
        that fails or is full ends the session with its error instead of being replaced or waited for."""
        session = self.open_session(max_length, batch_size, give_up)
        try:
            with self.use_session(session):
                yield session
        finally:
            session.close()

    def open_session(
        self, max_length: int, batch_size: int | None = 1, give_up: threading.Event | None = None
    ) -> GenerationSession:
        """An inference session as `inference_session` opens one, not active yet (`use_session`) and not closed for
        the caller: what outlives one `with` block (a session kept between an API's requests)."""
        with torch.no_grad():  # generation does not train: send plain copies of the trained tensors
            tuning = self.remote_tuning()
            tuning = tuning.with_tensors(*(None if t is None else t.detach() for t in (tuning.prompts, tuning.lora_flat)))
            prefix = None if self.prompts is None else self.prompts.prefix.detach()
        return GenerationSession(self.sequence, max_length, batch_size, prefix, tuning, self.local_blocks, give_up)

    @contextmanager
    def use_session(self, session: GenerationSession) -> Iterator[GenerationSession]:
        """Make `session` this thread's active one inside (forward and generate continue it); it stays open after."""
        if self.session is not None:
            raise RuntimeError("this thread already has an active inference session on this model")
        token = _active_sessions.set(MappingProxyType({**_active_sessions.get(), id(self): session}))
        try:
            yield session
        finally:
            _active_sessions.reset(token)

    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs):
        """transformers' generate. Outside an inference session it opens one sized for this call
        (prompt + new tokens) and closes it when the call returns or raises."""
        if kwargs.get("inputs_embeds") is not None:
            raise NotImplementedError("generate with inputs_embeds is not supported yet; pass input_ids")
        use_cache = _setting("use_cache", kwargs, generation_config, self.generation_config)
        if self.session is not None or use_cache is False:
            return self._generate(inputs, generation_config, kwargs)
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is None:
            raise ValueError("generate needs input_ids (a prompt) to size its inference session")
        max_length = self._total_length(prompt.shape[-1], kwargs, generation_config)
        # transformers' prompt lookup may draft up to K tokens past max_length (they are never kept): room for them
        max_length += _setting("prompt_lookup_num_tokens", kwargs, generation_config, self.generation_config) or 0
        with self.inference_session(max_length, batch_size=None):
            return self._generate(inputs, generation_config, kwargs)

    def _generate(self, inputs: torch.Tensor | None, generation_config: GenerationConfig | None, kwargs: dict):
        """transformers' generate; speculative decoding (assisted generation) gets the session as a croppable cache."""
        lookup = _setting("prompt_lookup_num_tokens", kwargs, generation_config, self.generation_config)
        if self.session is not None and (lookup is not None or kwargs.get("assistant_model") is not None):
            if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
                raise ValueError("Meadow keeps the KV cache on the servers: do not pass a cache to generate")
            kwargs = {**kwargs, "cache": RemoteCache(self.session)}
        return super().generate(inputs, generation_config, **kwargs)

    def _total_length(self, prompt_length: int, kwargs: dict, generation_config: GenerationConfig | None) -> int:
        """Prompt plus new tokens, read the way generate reads it: kwargs, then the generation config passed,
        then the model's."""
        max_new_tokens = _setting("max_new_tokens", kwargs, generation_config, self.generation_config)
        if max_new_tokens is not None:
            return prompt_length + max_new_tokens
        max_length = _setting("max_length", kwargs, generation_config, self.generation_config)
        return max(max_length, prompt_length + 1) if max_length is not None else prompt_length + DEFAULT_NEW_TOKENS


def _setting(name: str, kwargs: dict, *configs: GenerationConfig | None):
    """A generation setting by transformers' priority: a generate kwarg, then the first config that sets it."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    values = (getattr(config, name, None) for config in configs if config is not None)
    return next((value for value in values if value is not None), None)


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; no dispatched op (tens of microseconds per generated token) when it is there already."""
    return tensor if tensor.device == device else tensor.to(device)


def with_prefix(
    prefix: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Put the prompt embeddings (P, H) before every row of hidden (B, T, H), at positions 0..P-1 and unmasked;
    position_ids (B, T) must already count from P."""
    prefix_length, batch = prefix.shape[0], hidden.shape[0]
    hidden = torch.cat([prefix.to(hidden.device, hidden.dtype).expand(batch, prefix_length, -1), hidden], dim=1)
    prefix_positions = torch.arange(prefix_length, device=position_ids.device).expand(batch, prefix_length)
    position_ids = torch.cat([prefix_positions, position_ids], dim=1)
    mask = torch.cat([torch.ones(batch, prefix_length, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
    return hidden, position_ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions (B, L) the way transformers' generate makes them from an attention mask (B, L):
    real tokens count 0, 1, 2, ... (cumsum - 1) and padding sits at 0."""
    return (mask.long().cumsum(-1) - 1).masked_fill(~mask.bool(), 0)


TUNING_MODES = ("ptune", "deep_ptune")


def load_distributed(
    model_class: type[DistributedPreTrainedModel],
    model: str | Path,
    initial_peers: Sequence[str] = (),
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    sequence=None,
    tuning_mode: str | None = None,
    pre_seq_len: int = 0,
    lora=None,
    config_overrides: dict | None = None,
    local_blocks: int = 0,
    **kwargs,
) -> DistributedPreTrainedModel:
    """Load the config and the client-side parts only (no block weights but the first `local_blocks`, if asked),
    add what the client trains, and join the swarm (`kwargs` go to `connect_sequence`: client_config, dht_prefix,
    active_adapter, ...). `sequence=` replaces the swarm with any object of the RemoteSequence interface (tests use
    an in-process one)."""
    path = resolve_model_path(model)
    # a multimodal model's text part (Gemma 3's): what the client runs, as the text model's own config describes it
    config = load_hf_config(path, **(config_overrides or {})).get_text_config()
    config.name_or_path = str(path)  # as transformers' from_pretrained sets it: where the model came from
    block_config = load_config(path)
    _check_local_blocks(local_blocks, block_config.num_hidden_layers, tuning_mode, lora, kwargs.get("active_adapter"))
    parts = load_client_parts(path, block_config, dtype, device)
    prompts = None
    if tuning_mode is not None:
        if tuning_mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES} or None, got {tuning_mode!r}")
        std = getattr(config, "initializer_range", 0.02)
        prompts = PromptTuning(block_config, pre_seq_len, deep=tuning_mode == "deep_ptune", init_std=std).to(device, dtype)
    client_lora = None
    if lora is not None:
        if getattr(lora, "lora_dropout", 0.0):
            raise ValueError("LoRA dropout is not supported for client-owned LoRA; set lora_dropout=0.0")
        client_lora = ClientLora.from_peft_config(block_config, lora).to(device, dtype)
    if sequence is None:
        from meadow.client.sequence import connect_sequence

        sequence = connect_sequence(path, block_config, initial_peers=initial_peers, first_block=local_blocks, **kwargs)
    distributed = model_class(config, parts, sequence, prompts, client_lora)
    if local_blocks:
        distributed.local_blocks = LocalBlocks(load_blocks(path, block_config, 0, local_blocks, dtype, device, progress=False), block_config)
    if (path / "generation_config.json").exists() and isinstance(distributed, GenerationMixin):
        distributed.generation_config = GenerationConfig.from_pretrained(path)
    return distributed


def _check_local_blocks(count: int, num_blocks: int, tuning_mode: str | None, lora, active_adapter: str | None) -> None:
    if not 0 <= count < num_blocks:
        raise ValueError(f"local_blocks must be in [0, {num_blocks}) for this {num_blocks}-block model, got {count}")
    unsupported = {"tuning_mode='deep_ptune'": tuning_mode == "deep_ptune", "lora": lora is not None, "active_adapter": active_adapter}
    for option, used in unsupported.items():
        if count and used:
            raise ValueError(f"local_blocks cannot be combined with {option} yet: the local blocks would run without it")


class AutoDistributedModelForCausalLM:
    """Entry point like transformers' AutoModelForCausalLM: `from_pretrained(model, initial_peers, ...)`.
    Options: `tuning_mode="ptune"|"deep_ptune"` with `pre_seq_len=N` (trainable prompts), `lora=LoraConfig(...)`
    (trainable LoRA weights of the client's own for the remote blocks), `active_adapter=NAME` (a LoRA adapter the
    servers serve), `local_blocks=N` (run the first N blocks here: servers never see the token embeddings; memory
    of N blocks), `client_config=ClientConfig(...)`, `dtype`, `device`."""

    @classmethod
    def from_pretrained(cls, model: str | Path, initial_peers: Sequence[str] = (), **kwargs) -> DistributedModelForCausalLM:
        return load_distributed(DistributedModelForCausalLM, model, initial_peers, **kwargs)
