"""Settings: read once from the environment and ``.env``, then passed down.

Every variable is documented, with its default, in ``.env.example``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: A list setting written as comma-separated values: ``SLACK_ADMIN_IDS=U01,U02``.
IdList = Annotated[list[str], NoDecode]


class ConfigurationError(Exception):
    """The configuration cannot work; the message says which setting and why."""


class Settings(BaseSettings):
    """All of the bot's configuration. Build once with :func:`load_settings`."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="Where the database and model live.")
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; empty means SQLite at DATA_DIR/chatbot.db.",
    )
    model_path: str = Field(
        default="",
        description="A Hugging Face causal-LM folder or hub id; empty means DATA_DIR/model, "
        "built on first use.",
    )
    # Where the model runs: auto is CUDA with bfloat16 when torch sees a GPU, else the CPU
    # with float32 (model/service.py LocalModel.load).
    model_device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$")
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Serving (model/batching.py): requests arriving together share a batch of at most this
    # many, the scheduler waits this long for a batch to fill, at most this many requests wait
    # beyond the batch (more are told the bot is busy), and each gets this long in all.
    batch_max_size: int = Field(default=32, ge=1, le=1024)
    batch_max_wait_ms: float = Field(default=5.0, ge=0, le=10_000)
    model_queue_size: int = Field(default=256, ge=1)
    generation_timeout_seconds: float = Field(default=120.0, gt=0)
    # torch threads the model decodes on; 0: one for a small model on the CPU (its steps are
    # Python overhead), else every core (model/batching.py decoding_threads).
    model_threads: int = Field(default=0, ge=0)
    # Where the local model decodes: separate (a child process with its own interpreter lock,
    # model/worker_process.py) or same (a thread of the bot's process).
    model_process: Literal["separate", "same"] = "separate"
    # Where replies are generated: local (this process, MODEL_PATH) or remote (an
    # OpenAI-compatible completions server at MODEL_URL: vLLM, TGI, llama.cpp, transformers serve).
    model_backend: Literal["local", "remote"] = "local"
    model_url: str = ""  # e.g. http://127.0.0.1:8000/v1 (remote only)
    model_api_key: str = ""  # sent as a bearer token (remote only); empty: none
    model_name: str = ""  # the served model's id (remote only); empty: the server's first model
    model_context_window: int = Field(default=4096, ge=64)  # tokens (remote only)
    model_retries: int = Field(default=3, ge=0, le=20)  # on 429/5xx/connection errors (remote)
    system_prompt: str = ""
    max_new_tokens: int = Field(default=128, ge=1, le=4096)
    # Decoding (model/service.py GenerationSettings). Temperature 0 is greedy decoding.
    generation_temperature: float = Field(default=0.0, ge=0)
    generation_top_p: float = Field(default=1.0, gt=0, le=1)
    generation_repetition_penalty: float = Field(default=1.0, gt=0)
    generation_stop_strings: IdList = Field(default_factory=list)  # each ends a reply
    history_turns: int = Field(default=20, ge=1, le=1000)
    max_message_chars: int = Field(default=1_000_000, ge=1)
    log_level: str = "WARNING"
    # text: one readable line per record; json: one JSON object per line, with the request id
    # of the message it is about (bot/observability/structured_logs.py).
    log_format: Literal["text", "json"] = "text"
    # The bot's HTTP server (bot/web.py): /healthz, /readyz, /metrics and the dashboard. Port 0
    # picks a free one (logged at start); -1 turns the server off.
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(default=8080, ge=-1, le=65535)

    # Crash recovery and stopping (bot/service.py, bot/cli.py).
    # Unanswered messages younger than this are answered after a crash; older ones give up.
    unanswered_max_age_seconds: float = Field(default=600.0, gt=0)
    recovery_interval_seconds: float = Field(default=15.0, gt=0)  # between recovery passes
    # An instance's heartbeat lease: a crashed instance's messages are taken over this long
    # after its last renewal (at once when it ran on this host and its process is gone).
    instance_lease_seconds: float = Field(default=60.0, gt=0)
    # A reply recorded but not sent this long after goes to the retry queue.
    delivery_grace_seconds: float = Field(default=60.0, ge=0)
    # Streamed edits a second for all replies of one workspace together (0: no limit).
    progress_edits_per_second: float = Field(default=1.0, ge=0)
    # A reply not ready this long after generation starts shows a placeholder (Slack) or
    # typing (Discord), then edits; a quicker one is posted as it is (0: always at once).
    placeholder_delay_seconds: float = Field(default=1.0, ge=0)
    delivery_retry_seconds: float = Field(default=30.0, gt=0)  # between retry-queue passes
    # SIGTERM / SIGINT: how long replies in flight may take to finish before the bot exits.
    shutdown_drain_seconds: float = Field(default=20.0, ge=0)

    # Learning data (bot/learning/).
    export_dir: Path | None = Field(
        default=None, description="Where export shards go; empty means DATA_DIR/exports."
    )
    export_schedule: str = ""  # "interval:<seconds>" or "cron:<crontab>", empty for none
    export_include_unrated: bool = False
    export_context_turns: int = Field(default=6, ge=0, le=100)
    export_workers: int = Field(default=0, ge=0, le=64)  # processes for large exports; 0: auto
    # Regions whose national phone formats the redaction knows (ISO 3166 codes; numbers written
    # with a "+" country code are found whatever this says).
    phone_regions: IdList = Field(default_factory=lambda: ["US", "GB"])
    pseudonym_key: str = ""  # secret for user pseudonyms; empty: DATA_DIR/pseudonym.key

    # Retraining (model/train.py, model/retrain.py, model/registry.py).
    models_dir: Path | None = Field(
        default=None, description="Model versions and the current pointer; empty: DATA_DIR/models."
    )
    model_watch_seconds: float = Field(default=5.0, gt=0)  # how often replicas read the pointer
    retrain_epochs: int = Field(default=20, ge=1)  # times each exchange is shown
    retrain_replay_ratio: float = Field(default=15.0, ge=0)  # starter exchanges per new one shown
    retrain_learning_rate: float = Field(default=1e-3, gt=0)
    retrain_batch_size: int = Field(default=16, ge=1)
    retrain_method: Literal["auto", "full", "lora"] = "auto"  # auto: LoRA from 100M parameters
    retrain_lora_from_parameters: int = Field(default=100_000_000, ge=0)
    retrain_threads: int = Field(default=0, ge=0)  # trainer's torch threads; 0: every core
    retrain_holdout_from: int = Field(default=200, ge=1)  # exchanges before a split is held out
    retrain_holdout_percent: int = Field(default=10, ge=0, le=50)
    retrain_learned_share: float = Field(default=0.9, ge=0, le=1)  # of the new exchanges
    retrain_margin: float = Field(default=0.02, ge=0, le=1)  # allowed loss on held-out/regression
    retrain_dp_epsilon: float | None = Field(default=None, gt=0)  # DP-SGD target ε; empty: off
    retrain_dp_delta: float = Field(default=1e-5, gt=0, lt=1)
    retrain_on_forget: bool = False  # a forget-me retrains when the serving model learned them
    retrain_after_exported: int = Field(default=0, ge=0)  # scheduled retrain after N; 0: never

    # The admin dashboard (bot/dashboard/): the token that logs in; empty: a random one per
    # run, so only the one-time login link printed at start opens it.
    dashboard_token: str = ""

    # Slack (adapters/slack_adapter.py). Socket Mode when SLACK_APP_TOKEN is set, else HTTP mode.
    slack_bot_token: str = ""
    slack_app_token: str = ""
    slack_signing_secret: str = ""
    slack_port: int = Field(default=3000, ge=0, le=65535)
    slack_api_url: str = "https://slack.com/api/"
    slack_admin_ids: IdList = Field(default_factory=list)
    slack_agent_ids: IdList = Field(default_factory=list)

    # Discord (adapters/discord_adapter.py).
    discord_bot_token: str = ""
    discord_api_url: str = "https://discord.com/api/v10"
    discord_gateway_url: str = "wss://gateway.discord.gg/"
    discord_admin_ids: IdList = Field(default_factory=list)
    discord_admin_role_ids: IdList = Field(default_factory=list)
    discord_agent_ids: IdList = Field(default_factory=list)
    discord_agent_role_ids: IdList = Field(default_factory=list)

    @field_validator(
        "slack_admin_ids",
        "slack_agent_ids",
        "discord_admin_ids",
        "discord_admin_role_ids",
        "discord_agent_ids",
        "discord_agent_role_ids",
        "phone_regions",
        "generation_stop_strings",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("retrain_dp_epsilon", "export_dir", "models_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("phone_regions")
    @classmethod
    def _known_regions(cls, value: list[str]) -> list[str]:
        import phonenumbers

        regions = [region.upper() for region in value]
        unknown = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"unknown region code(s) {', '.join(unknown)} (use e.g. US,GB,DE)")
        return regions

    @model_validator(mode="after")
    def _remote_needs_url(self) -> Settings:
        if self.model_backend == "remote" and not self.model_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError("MODEL_BACKEND=remote needs MODEL_URL, e.g. http://gpu-host:8000/v1")
        return self

    @property
    def slack_configured(self) -> bool:
        return bool(self.slack_bot_token)

    @property
    def discord_configured(self) -> bool:
        return bool(self.discord_bot_token)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'chatbot.db').resolve()}"

    @property
    def resolved_export_dir(self) -> Path:
        return self.export_dir or self.data_dir / "exports"

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def default_model_dir(self) -> Path:
        return self.data_dir / "model"

    @property
    def uses_default_model(self) -> bool:
        return not self.model_path

    @property
    def resolved_model_path(self) -> str:
        return self.model_path or str(self.default_model_dir)


def load_settings(**overrides: object) -> Settings:
    """Read the settings; validation errors become one readable :class:`ConfigurationError`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']).upper() or 'settings'}: {e['msg']}"
            for e in error.errors()
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from None
