"""TrainJobConfig: the typed config tree of ``python -m jobs.train`` (defaults ← YAML ← named flags ← ``--set``).

Defaults are the official Lumina-Next recipe (docs/official-formats.md#training-recipe): AdamW lr 1e-4, weight decay 0,
betas (0.9, 0.999), constant LR without warm-up, gradient clipping at 2.0, EMA 0.9999 every step, bf16 on GPU, 100k
steps. The tree is saved into every checkpoint and crosses the Ray boundary as its dict form
(docs/architecture.md#design-rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.config_io import ConfigError
from models.flow import FlowConfig
from models.presets import MODALITIES, PRESETS, NextDiTConfig
from models.sampler import SamplerConfig

PRECISIONS = ("auto", "bf16", "fp32")
TEXT_SOURCES = ("auto", "shards", "online")
WANDB_MODES = ("online", "offline", "disabled")
LORA_DEFAULT_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


@dataclass
class DataConfig:
    """Where samples come from: a ``jobs.prepare`` output (local or s3://)."""

    uri: str = ""
    modality: str = "auto"  # the manifest rows to train on: image or audio; auto: the model's modality
    # "shards": text features precomputed in the shards (text.npy); "online": encode captions with a frozen
    # text encoder on the worker; "auto": shards when the shards carry text.npy, else online.
    text_features: str = "auto"
    text_encoder: str | None = None  # TextEncoder folder (needed for "online", and for the empty prompt of dropout)
    vae: str | None = None  # AutoencoderKL folder: online VAE encoding when shards carry images instead of latents
    # Samples per worker per micro-batch. None: each bucket's manifest value (jobs.prepare's batch_tokens // tokens);
    # a number: that many in every bucket (small data sets: the manifest's token-based values are sized for large
    # corpora); bucket_micro_batch overrides single buckets ({"256x256": 4}) on top of either.
    micro_batch: int | None = None
    bucket_micro_batch: dict[str, int] = field(default_factory=dict)
    label_key: str = "label"  # class-conditional task: the json metadata field that holds the class index
    seed: int = 0  # shuffle seed of the per-epoch plan (shard order per bucket, bucket draws)
    open_shards: int = 2  # shard streams a worker keeps open (it reads its samples from them one at a time)
    # steps whose samples a background thread reads and decodes ahead of training (0: read on the training thread);
    # memory: that many steps of samples per worker
    prefetch_steps: int = 2


@dataclass
class ModelConfig:
    # the released Lumina-Next T2I checkpoints are the GQA variant (docs/official-formats.md#size-configs)
    preset: str = "2B-GQA"
    overrides: dict[str, Any] = field(default_factory=dict)  # NextDiTConfig fields, e.g. {n_layers: 4}
    init_from: str | None = None  # a model folder (ours / official / diffusers) to start from; required for LoRA
    init_ema: bool = False  # start from the folder's EMA weights
    # The architecture as the driver resolved it before any worker started (preset or init_from, caption width from
    # the text encoder or the shards, what it was trained on): workers use it instead of resolving again. Leave unset.
    resolved: NextDiTConfig | None = None
    # References written into the exported model folder for the Sampler (default: data.text_encoder / data.vae).
    text_encoder: str | None = None
    vae: str | None = None
    # class-conditional task: one name per class (index order), written to the export so prompts can name classes
    class_names: list[str] | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 2.0  # global L2 norm (official clip_grad 2.0)
    warmup_steps: int = 0  # official: constant LR; >0 ramps linearly from 0


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999  # official: every step, over all parameters


@dataclass
class LoRAConfig:
    """LoRA fine-tuning through peft: the base weights are frozen, only adapters train and are exported."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    # ZeRO-3 keeps parameters below this many elements unpartitioned (DeepSpeed's default 1e5); tests set 0 so even the
    # tiny model is really sharded.
    param_persistence_threshold: int = 100_000
    offload_optimizer: bool = False  # ZeRO-Offload of the optimizer state to CPU memory
    overlap_comm: bool = True
    # torch's AdamW instead of DeepSpeed's FusedAdam on GPU: no JIT build of the CUDA op at start-up (images without
    # nvcc), a slightly slower optimizer step. CPU runs always use torch's AdamW.
    torch_adam: bool = False
    # ZeRO-3 gathers each transformer block's partitions at once (one fetch hook per block rather than one per linear
    # and norm: far less Python overhead per step, fewer and larger all-gathers); the block's parameters are resident
    # while it runs. false: DeepSpeed's per-submodule default (always used for LoRA runs, parallelize.py says why).
    gather_whole_blocks: bool = True
    # ZeRO-3: build the model already partitioned (deepspeed.zero.Init): no rank ever holds the whole model, which is
    # what lets the 7B presets start on GPUs and nodes that cannot hold one fp32 copy per rank. The seeded weights are
    # those of an unpartitioned build; model.init_from is read by rank 0 alone and scattered module by module. LoRA runs
    # build the frozen base whole (peft wraps it before DeepSpeed does).
    zero_init: bool = True


@dataclass
class TrainConfig:
    task: str = "auto"  # a name of tasks.TASKS (t2i, class, t2a); auto: the task of the model's modality, conditioning
    steps: int = 100_000  # official max_steps
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = micro-batch × workers × grad_accum)
    # resuming on another number of workers keeps the checkpoint's global batch by setting grad_accum (driver.
    # keep_global_batch); false: the global batch follows the new worker count
    keep_global_batch: bool = True
    seed: int = 0  # model init and per-sample noise / t / dropout draws
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    # Proportional attention in the training forward. Off: the official recipe trains with the plain 1/sqrt(hd)
    # scale and sets the proportional one only at sampling (where the model config's proportional_attn applies);
    # on: every bucket trains with the scale the sampler uses for its token count (docs/training.md).
    proportional_attn: bool = False
    activation_checkpointing: bool = False
    # Selective checkpointing: recompute every n-th block only (1 = every block; 2 = half the recomputation for more
    # activation memory) — the torchtitan knob.
    activation_checkpointing_every: int = 1
    # torch.compile each transformer block's forward (torchtitan's per-block recipe): one compile per bucket shape
    # serves every block; the first step of each new bucket pays it (docs/training.md).
    compile: bool = False
    log_every: int = 10
    ckpt_every: int = 1000
    # Data lineage: the sample keys every rank consumed at every step, under {run}/samples/ (loop.SampleRecorder).
    record_samples: bool = False


@dataclass
class ScalingConfig:
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # Ray custom resources each worker asks for on top of CPU/GPU, e.g. {train_gpu: 1}: the resource a node group
    # advertises (infra/kuberay/raycluster.yaml's train-gpu), so the workers land on, and the autoscaler scales, that
    # group only (docs/training.md#on-a-cluster).
    custom_resources: dict[str, float] = field(default_factory=dict)
    # e.g. "H100": Ray schedules workers only on nodes whose GPUs Ray detected as that type (its
    # `accelerator_type:H100` resource). GPU runs only.
    accelerator_type: str | None = None


@dataclass
class RunConfig:
    storage: str = ""  # storage_path of Ray Train: local path or s3://bucket/prefix
    name: str = "nextdit"  # run name; rerunning with the same name resumes from its latest checkpoint
    num_to_keep: int = 2
    max_failures: int = 3  # worker failures Ray Train recovers from (restart + resume from the latest checkpoint)
    # "async": a checkpoint uploads to storage in the background while training goes on (Ray Train's ASYNC upload
    # mode; the local copy is deleted once uploaded); "sync": the step waits for the upload
    # (docs/training.md#checkpoints-and-resume)
    checkpoint_upload: str = "async"


@dataclass
class LoggingConfig:
    # online / offline / disabled. None (the default): the WANDB_MODE of the environment, else offline — so a
    # cluster's WANDB_MODE=online takes effect, while a mode written in the config is the user's choice and wins
    # (docs/training.md#metrics).
    wandb: str | None = None
    wandb_project: str = "lumina-ray"
    progress: bool = True
    # Peak dense TFLOP/s of one accelerator for MFU; None = look the device up in metrics.PEAK_TFLOPS.
    peak_tflops: float | None = None


@dataclass
class EvalConfig:
    """In-training evaluation (docs/training.md#in-training-evaluation): every ``every`` steps and at the last step,
    rank 0 generates the fixed ``prompts`` × ``seeds`` (or ``class_labels`` × ``seeds``) with the EMA weights, stores
    them under ``{run}/eval/step_{step:08d}/`` and scores them; ``{run}/eval/metrics.jsonl`` and ``curve.png`` hold
    the quality curve. Off by default: it costs rank 0 a text encoder, a VAE and a model copy, and the other ranks
    wait for it."""

    every: int = 0  # steps between evaluations; 0: off
    prompts: list[str] = field(default_factory=list)  # text-conditioned models; class models: class names or indices
    # one prompt per line, or JSON lines with a "prompt" (jobs.generate's prompt file), local or s3://; read by the
    # driver and appended to ``prompts``
    prompt_file: str | None = None
    class_labels: list[int] = field(default_factory=list)  # class-conditional models: class indices
    seeds: list[int] = field(default_factory=lambda: [0])  # every prompt (label) is generated with each seed
    # the Sampler's own settings (default: midpoint, 10 steps, CFG 4): steps, solver, guidance, batch_size; width /
    # height (images), duration (audio), points (point clouds), None: the model's training size
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    use_ema: bool | None = None  # None: the EMA weights when ema.enabled, else the raw ones
    # training samples (the largest bucket's first ones) the built-in metric compares against: latent_fd for images
    # and audio, MMD-CD / COV-CD for point clouds; 0: none
    reference_samples: int = 32
    # a transformers CLIP folder (image models) or CLAP folder (audio models), local, s3:// or a Hub id: adds
    # clip_score / clap_score, each sample against its prompt; None: no scoring model
    clip_model: str | None = None
    # more scores: "package.module:function" callables, fn(list[evaluation.EvalSample]) -> {name: float}
    # (jobs.demo_data:colour_fidelity is the demo's)
    scorers: list[str] = field(default_factory=list)


@dataclass
class TrainJobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> TrainJobConfig:
        """Value checks that types cannot express; raises ConfigError before any worker starts."""
        if not self.data.uri:
            raise ConfigError("--data (data.uri) is required: the output folder of jobs.prepare")
        if not self.run.storage:
            raise ConfigError("--storage (run.storage) is required: a local path or s3:// URI for checkpoints")
        if self.model.preset not in PRESETS:
            raise ConfigError(f"unknown model preset {self.model.preset!r}; choose one of {', '.join(PRESETS)}")
        from jobs.training.tasks import TASKS  # the registry (tasks.py); torch is there on the driver and workers

        if self.train.task not in (*TASKS, "auto"):
            raise ConfigError(f"train.task must be auto or one of {list(TASKS)}, got {self.train.task!r}")
        if self.data.modality not in ("auto", *MODALITIES):
            raise ConfigError(f"data.modality must be auto or one of {list(MODALITIES)}, got {self.data.modality!r}")
        if self.train.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {list(PRECISIONS)}")
        if self.data.text_features not in TEXT_SOURCES:
            raise ConfigError(f"data.text_features must be one of {list(TEXT_SOURCES)}")
        if self.data.text_features == "online" and not self.data.text_encoder:
            raise ConfigError("data.text_features=online needs --text-encoder")
        for name in ("steps", "grad_accum", "log_every", "ckpt_every", "activation_checkpointing_every"):
            if getattr(self.train, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1")
        if self.scaling.workers < 1:
            raise ConfigError("--workers must be >= 1")
        if self.run.checkpoint_upload not in ("async", "sync"):
            raise ConfigError(f"run.checkpoint_upload must be async or sync, got {self.run.checkpoint_upload!r}")
        if self.data.prefetch_steps < 0 or self.data.open_shards < 1:
            raise ConfigError("data.prefetch_steps must be >= 0 and data.open_shards >= 1")
        for name, amount in self.scaling.custom_resources.items():
            if name in ("CPU", "GPU", "memory") or name.startswith("accelerator_type:"):
                raise ConfigError(f"scaling.custom_resources.{name}: set it with scaling.cpus_per_worker, "
                                  "scaling.gpus_per_worker or scaling.accelerator_type")
            if amount <= 0:
                raise ConfigError(f"scaling.custom_resources.{name} must be > 0")
        if self.scaling.accelerator_type and not self.scaling.gpu:
            raise ConfigError("scaling.accelerator_type needs a GPU run (--gpu)")
        if self.deepspeed.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("deepspeed.zero_stage must be 0..3")
        if self.optim.lr <= 0 or self.optim.grad_clip < 0 or self.optim.warmup_steps < 0:
            raise ConfigError("optim.lr must be > 0, optim.grad_clip and optim.warmup_steps >= 0")
        if not 0.0 <= self.ema.decay < 1.0:
            raise ConfigError("ema.decay must lie in [0, 1)")
        if self.lora.enabled and not self.model.init_from:
            raise ConfigError("LoRA fine-tunes a pretrained model: set model.init_from")
        if self.lora.enabled and self.lora.rank < 1:
            raise ConfigError("lora.rank must be >= 1")
        if self.data.micro_batch is not None and self.data.micro_batch < 1:
            raise ConfigError("data.micro_batch must be >= 1 (or null: each bucket's manifest value)")
        for bucket, mb in self.data.bucket_micro_batch.items():
            if mb < 1:
                raise ConfigError(f"data.bucket_micro_batch.{bucket} must be >= 1")
        if self.logging.wandb is not None and self.logging.wandb not in WANDB_MODES:
            raise ConfigError(f"logging.wandb must be one of {list(WANDB_MODES)} (or null: WANDB_MODE, else "
                              f"offline), got {self.logging.wandb!r}")
        if "/" in self.run.name or not self.run.name:
            raise ConfigError("run.name must be a non-empty name without '/'")
        self.validate_eval()
        return self

    def validate_eval(self) -> None:
        """The eval section's own values; what depends on the model and the data (prompts for a text model, labels
        within its classes, a text encoder to read the prompts) the driver checks (driver.check_eval)."""
        e = self.eval
        if e.every < 0:
            raise ConfigError("eval.every must be >= 0 (0: no in-training evaluation)")
        if e.reference_samples < 0:
            raise ConfigError("eval.reference_samples must be >= 0")
        if any(label < 0 for label in e.class_labels):
            raise ConfigError("eval.class_labels must be class indices >= 0")
        if e.every and not e.seeds:
            raise ConfigError("eval.seeds must name at least one seed")
        if e.use_ema and not self.ema.enabled:
            raise ConfigError("eval.use_ema=true needs the EMA (ema.enabled)")
        for name in e.scorers:
            module, _, function = name.partition(":")
            if not module or not function:
                raise ConfigError(f"eval.scorers: {name!r} is not 'package.module:function'")
