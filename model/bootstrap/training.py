"""The default model's training loop: a lean Llama forward, AdamW, warmup and cosine decay."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from model.bootstrap.config import IGNORE_INDEX, BootstrapConfig
from model.bootstrap.data import Example, collate, make_batches, make_dialogues


def seed_everything(seed: int) -> None:
    """Seed every random number generator the build touches."""
    random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def learning_rate_at(progress: float, config: BootstrapConfig) -> float:
    """Learning rate at ``progress`` (0..1 of training): linear warmup, then cosine decay."""
    if progress < config.warmup_fraction:
        return config.learning_rate * max(progress / config.warmup_fraction, 0.01)
    progress = (progress - config.warmup_fraction) / (1.0 - config.warmup_fraction)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.learning_rate * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def build_llama(tokenizer: PreTrainedTokenizerFast, config: BootstrapConfig) -> LlamaForCausalLM:
    """A freshly initialised Llama sized by ``config``, with the tokenizer's special ids."""
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    llama_config._attn_implementation = "sdpa"  # only used by generation; training has its own
    if config.multi_turn_share == 0:
        # Trained on single exchanges only: earlier turns in a prompt derail it, so tell
        # model.service.LocalModel to leave them out (saved in config.json).
        llama_config.chat_history_pairs = 0
    model = LlamaForCausalLM(llama_config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def llama_hidden_states(model: LlamaForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """The final (normed) hidden states of ``model`` for right-padded ``input_ids``.

    The same arithmetic as ``model.model(input_ids=...)`` (checked by :func:`check_forward`),
    written out for training only: fused ``rms_norm``, one matmul for q/k/v and one for the MLP's
    gate/up, causal SDPA with no mask tensor, and none of the generic forward's bookkeeping
    (cache, masks, hooks) make each step about a third faster on CPU.
    Serving uses the ordinary Hugging Face forward.
    """
    body = model.model
    config = model.config
    batch, length = input_ids.shape
    heads: int = config.num_attention_heads
    kv_heads: int = config.num_key_value_heads or heads
    head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps = config.rms_norm_eps
    width = (config.hidden_size,)
    hidden = body.embed_tokens(input_ids)
    positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
    cos, sin = body.rotary_emb(hidden, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-second, first), dim=-1) * sin

    for layer in body.layers:
        attention, mlp = layer.self_attn, layer.mlp
        normed = F.rms_norm(hidden, width, layer.input_layernorm.weight, eps)
        # One matmul for q, k and v (Llama has no projection biases).
        qkv_weight = torch.cat(
            (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight)
        )
        q, k, v = F.linear(normed, qkv_weight).split(
            (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1
        )
        q = q.view(batch, length, heads, head_dim).transpose(1, 2)
        k = k.view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = v.view(batch, length, kv_heads, head_dim).transpose(1, 2)
        mixed = F.scaled_dot_product_attention(
            rotate(q), rotate(k), v, is_causal=True, enable_gqa=kv_heads != heads
        )
        hidden = hidden + attention.o_proj(mixed.transpose(1, 2).reshape(batch, length, -1))
        normed = F.rms_norm(hidden, width, layer.post_attention_layernorm.weight, eps)
        gate, up = F.linear(normed, torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight))).chunk(
            2, dim=-1
        )
        hidden = hidden + mlp.down_proj(F.silu(gate) * up)
    return F.rms_norm(hidden, width, body.norm.weight, eps)


def check_forward(model: LlamaForCausalLM, input_ids: torch.Tensor) -> None:
    """Fail loudly if :func:`llama_hidden_states` ever drifts from the Hugging Face forward."""
    with torch.no_grad():
        ours = llama_hidden_states(model, input_ids)
        reference = model.model(input_ids=input_ids).last_hidden_state
    if not torch.allclose(ours, reference, atol=1e-4, rtol=1e-4):
        drift = (ours - reference).abs().max().item()
        raise RuntimeError(f"training forward differs from LlamaModel.forward by {drift:.2e}")


def make_optimizer(model: LlamaForCausalLM, config: BootstrapConfig) -> torch.optim.AdamW:
    """AdamW over all parameters; shared by the training loop and the seed rounds."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        betas=(0.9, config.beta2),
        weight_decay=config.weight_decay,
        fused=True,  # one kernel for all parameters: fewer tiny ops per step
    )


def train_step(
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    examples: Sequence[Example],
    batch: Sequence[Sequence[int]],
    *,
    lr: float,
    pad_id: int,
    grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on ``batch``; returns (loss, logits, targets, owners) of the answers.

    Forward, loss on answer positions only, backward, clip, step.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    input_ids, targets, owners = collate(examples, batch, pad_id)
    hidden = llama_hidden_states(model, input_ids)
    answer = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[answer])
    loss = F.cross_entropy(logits, targets[answer])
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, logits, targets[answer], owners[answer]


def train(
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    examples: Sequence[Example],
    config: BootstrapConfig,
    *,
    pad_id: int,
    progress: Callable[[str], None],
    started: float,
) -> float:
    """Train ``model`` in place on ``examples``; returns the last epoch's mean answer loss.

    A plain torch loop rather than ``transformers.Trainer``: on one CPU core the whole budget is
    ~105 s, and Trainer's per-step machinery (callbacks, collators, accelerate) costs time we
    need for optimizer steps. The loop also runs the output head only on answer positions (the
    only ones with a loss) and uses a lean forward (:func:`llama_hidden_states`).

    Dialogues: some exchanges are trained as later turns of a multi-exchange dialogue (see
    :func:`make_dialogues`), so history does not derail answers.
    """
    rng = random.Random(config.seed)
    model.train()
    check_forward(model, collate(examples, [[0]], pad_id)[0])
    mastered = [False] * len(examples)
    # The seed exchanges must come out word for word: train them several times per epoch.
    extra = [i for i, e in enumerate(examples) if e.seed] * (config.seed_repeats - 1)
    step = 0
    epoch_loss = float("nan")
    for epoch in range(config.epochs):
        # 1. This epoch's dialogues (one or two exchanges each), bucketed by length.
        dialogues = make_dialogues(
            examples, config.multi_turn_share, config.max_position_embeddings, rng, extra=extra
        )
        batches = make_batches(examples, dialogues, config.batch_tokens, rng)
        loss_sum, loss_tokens = 0.0, 0
        for index, batch in enumerate(batches):
            # 2. Schedule by epoch progress (packing makes the step count vary a little).
            lr = learning_rate_at((epoch + index / len(batches)) / config.epochs, config)
            # 3. Forward, loss on answer positions only, backward, clip, step.
            loss, logits, targets, owners = train_step(
                model, optimizer, examples, batch, lr=lr, pad_id=pad_id, grad_clip=config.grad_clip
            )
            step += 1
            # 4. Progress: which examples this forward pass reproduced exactly (every answer
            #    token the argmax under teacher forcing, which is what greedy decoding needs).
            with torch.no_grad():
                wrong = (logits.argmax(dim=-1) != targets).float()
                errors = torch.zeros(len(examples)).index_add_(0, owners, wrong)
            for dialogue in batch:
                for example in dialogue:
                    mastered[example] = bool(errors[example] == 0)
            count = len(targets)
            loss_sum += loss.item() * count
            loss_tokens += count
            if step % config.log_every == 0:
                progress(
                    f"step {step} epoch {epoch + 1}/{config.epochs} loss {loss.item():.4f} "
                    f"lr {lr:.2e} elapsed {time.monotonic() - started:.1f}s"
                )
        epoch_loss = loss_sum / max(1, loss_tokens)
        progress(
            f"epoch {epoch + 1}/{config.epochs} done: step {step} loss {epoch_loss:.4f} "
            f"exact {sum(mastered)}/{len(examples)} elapsed {time.monotonic() - started:.1f}s"
        )
    model.eval()
    return epoch_loss
