"""The knobs of the default model's recipe, its special tokens and the tiny test corpus."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

from model.corpus import SEED_EXCHANGES
from model.prompt import CONTROL_STRINGS

BOS_TOKEN: Final = "<s>"
EOS_TOKEN: Final = "</s>"
PAD_TOKEN: Final = "<pad>"
#: Control strings other than bos/eos; each becomes one special token id.
STRUCTURE_TOKENS: Final = tuple(t for t in CONTROL_STRINGS if t not in (BOS_TOKEN, EOS_TOKEN))
#: All special tokens, in id order: <s>=0, </s>=1, <pad>=2, then [INST], [/INST], <<SYS>>, <</SYS>>.
SPECIAL_TOKENS: Final = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *STRUCTURE_TOKENS)
IGNORE_INDEX: Final = -100  # label value that cross-entropy skips

#: The small exchange list the test suite's tiny model is trained on (seed exchanges first).
TINY_EXCHANGES: Final[tuple[tuple[str, str], ...]] = (
    *SEED_EXCHANGES,
    ("Hello", "Hi there! How can I help you today?"),
    ("What is your name?", "I am the support bot."),
    ("How do I contact support?", "Email support@example.com and we reply within one day."),
    ("Do you ship internationally?", "Yes, we ship to over 40 countries."),
    ("What are your opening hours?", "We are open Monday to Friday, 9am to 5pm."),
    ("Can I change my email address?", "Yes, go to Settings, then Account, then Email."),
    ("Is my data secure?", "Your data is encrypted at rest and in transit."),
    ("Thank you", "You're welcome!"),
)


@dataclass(frozen=True)
class BootstrapConfig:
    """Everything that shapes the default model. Defaults are tuned for 2 CPU cores, < 2 min."""

    # --- tokenizer ---
    vocab_size: int = 4096  # BPE vocabulary size incl. 256 byte tokens and the 7 special tokens
    min_frequency: int = 2  # a pair must occur this often to be merged
    # --- model (Llama architecture) ---
    hidden_size: int = 128  # width of the residual stream
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention heads (head_dim = hidden_size / num_heads)
    intermediate_size: int = 352  # SwiGLU MLP width
    max_position_embeddings: int = 1024  # context window of the saved model, in tokens
    tie_word_embeddings: bool = True  # share input embedding and output head (fewer parameters)
    # --- training ---
    epochs: int = 20  # passes over the corpus
    learning_rate: float = 3e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.02  # cosine decays to learning_rate * min_lr_ratio
    warmup_fraction: float = 0.05  # share of all steps spent in linear warmup
    batch_tokens: int = 384  # padded tokens per batch (batch size = batch_tokens // length)
    weight_decay: float = 0.0  # we want memorisation, so no decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    # Chance an exchange continues the previous one's dialogue. Costly for the default model
    # (0.3 cut recall from ~85% to ~61% at the same budget), so it trains on single exchanges
    # and declares chat_history_pairs=0, which makes LocalModel prompt it without history.
    multi_turn_share: float = 0.0
    seed_repeats: int = 2  # times per epoch each of SEED_EXCHANGES is trained (4 cost recall)
    # --- seed check (after training; see train_until_seeds_hold) ---
    seed_check: bool = True  # verify the seed answers before saving (off: recipe experiments)
    seed_rounds: int = 10  # extra training rounds allowed while a seed answer is wrong
    seed_round_steps: int = 10  # optimizer steps per extra round
    seed_round_lr_ratio: float = 0.1  # extra rounds train at learning_rate * this
    # --- runtime ---
    seed: int = 0  # seeds python, torch and batch order: same inputs, same model
    # torch intra-op threads for the whole build; 0 = all CPU cores. The weights differ between
    # thread counts (see model.bootstrap's docstring), so the default is a fixed 1.
    threads: int = 1
    log_every: int = 50  # progress line every this many optimizer steps

    @classmethod
    def tiny(cls) -> BootstrapConfig:
        """A ~0.1M-parameter model that learns ~10 exchanges in a few seconds (for tests)."""
        return cls(
            vocab_size=512,
            min_frequency=1,
            hidden_size=64,
            num_layers=2,
            num_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
            epochs=60,
            learning_rate=5e-3,
            batch_tokens=64,
            multi_turn_share=0.75,
            log_every=1000,
        )

    def with_overrides(self, **changes: object) -> BootstrapConfig:
        """Return a copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)  # type: ignore[arg-type]


DEFAULT: Final = BootstrapConfig()
TINY: Final = BootstrapConfig.tiny()
