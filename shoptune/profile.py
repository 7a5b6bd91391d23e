"""The schema of params.yaml: one dataclass per stage section, and a profile of them all.

`params.load_profile(name)` checks a whole profile against `Profile` before any stage
runs, so a typo anywhere (`gpu: true`, `gpus: 'no'`, a key in the wrong section) is one
line naming the key, not a stage that fails hours later or a setting silently ignored.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class FamilyParams:
    """synthesize.families.<name>: one task family's share of the data (shoptune/families)."""

    items: int  # items asked per product (per request; families with their own candidates: requests per product)
    locales: list[str] | None = None  # the sampled products of these locales only; null: every locale sampled


@dataclasses.dataclass
class EndpointParams:
    """One of several endpoints in base_url (shoptune/llm_endpoints.py): its URL, and where it differs
    from the section, its key's variable and the name it serves the model under (an Azure deployment)."""

    base_url: str
    api_key_env: str | None = None  # null: the section's api_key_env
    model: str | None = None  # null: the section's model


def endpoints(p) -> list[EndpointParams]:
    """base_url as a list of endpoints, each with its key's variable (a single or null base_url: one)."""
    listed = p.base_url if isinstance(p.base_url, list) else [p.base_url]
    out = []
    for entry in listed:
        entry = entry if isinstance(entry, EndpointParams) else EndpointParams(entry)
        out.append(EndpointParams(entry.base_url, entry.api_key_env or p.api_key_env, entry.model))
    return out


def is_self_hosted(p) -> bool:
    """A server of one's own (a vLLM server): every endpoint named, no Azure api_version."""
    return not p.api_version and all(e.base_url for e in endpoints(p))


@dataclasses.dataclass
class SynthesizeParams:
    catalog: str
    fewshot: str  # ShopBench rows; those whose task_name is a family's replace its own few-shot examples
    families: dict[str, FamilyParams]  # which task families, how many items each, which locales
    backend: str
    model: str
    base_url: str | list[str | EndpointParams] | None  # one endpoint, several, or null (OpenAI)
    api_key_env: str
    api_version: str | None
    options_per_question: int  # multiple-choice and retrieval families
    temperature: float
    max_tokens: int
    top_p: float
    concurrency: int  # requests in flight at most (the ceiling of the client's adaptive window)
    max_retries: int  # retries per request after the first attempt
    timeout: float  # seconds per attempt
    requests_per_minute: float | None  # null: no limit
    tokens_per_minute: float | None  # null: no limit
    max_cost: float | None  # dollars per run (needs a price for the model); null: no limit
    max_requests: int | None  # new requests per run; null: no limit
    prices: dict[str, list[float]]  # model: [input $/1M tokens, output $/1M tokens]
    max_failed_fraction: float  # the stage fails (exit 2, outputs still written) when more products fail
    max_products: int | None  # the first N products chosen; null: all of them
    products_per_locale: dict[str, int | None] | None  # {DE: 500, ...}: sampled with seed; null: every product
    seed: int


@dataclasses.dataclass
class CleanParams:
    min_options: int
    max_options: int
    ngram: int  # words per n-gram when comparing items with few-shot examples and evaluation questions
    max_fewshot_overlap: float  # an item sharing more of its n-grams with the few-shot examples is a copy
    max_eval_overlap: float  # ... with the profile's evaluation questions: contamination, rejected


@dataclasses.dataclass
class DatasetParams:
    setting: str
    extra: str | None
    val_fraction: float
    seed: int


@dataclasses.dataclass
class FinetuneParams:
    base_model: str
    prompt_format: str  # raw | chat | alpaca (shoptune/prompts.py): how a training row is written
    max_seq_length: int
    load_in_4bit: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str]
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    max_steps: int
    learning_rate: float
    warmup_steps: int
    optim: str
    weight_decay: float
    lr_scheduler_type: str
    logging_steps: int
    save_steps: int
    save_total_limit: int
    seed: int
    # How and where it trains (shoptune/training_launch.py, README "Scaling out"): the unsloth recipe, or
    # trl's SFTTrainer with a peft LoRA and no unsloth (the one FSDP and DeepSpeed can shard); N processes
    # (one per GPU; on a CPU, each a share of the cores) under `accelerate launch`, each with
    # per_device_train_batch_size x gradient_accumulation_steps rows a step; an accelerate config file
    # (configs/accelerate/: ddp, fsdp_qlora, deepspeed_zero3) for N > 1 or a sharding one for N = 1 (its offload
    # to host RAM); null: plain data parallel.
    backend: str = "unsloth"  # unsloth | trl
    num_processes: int = 1
    accelerate_config: str | None = None


@dataclasses.dataclass
class PadParams:
    check_logits: bool
    logits_atol: float


@dataclasses.dataclass
class QuantizeParams:
    w_bit: int
    q_group_size: int
    zero_point: bool
    version: str
    calib_samples: int
    calib_max_len: int


@dataclasses.dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int


@dataclasses.dataclass
class ApiParams:
    """infer.api: the OpenAI-compatible API of the openai inference backend, with the keys and meaning
    of synthesize's connection (shoptune/llm_connection.py)."""

    model: str  # the model name the API serves (Azure: the deployment)
    base_url: str | list[str | EndpointParams] | None  # a vLLM server (http://host:8000/v1), several; null: OpenAI
    api_key_env: str
    api_version: str | None  # set for Azure OpenAI, quoted
    concurrency: int
    max_retries: int
    timeout: float
    requests_per_minute: float | None
    tokens_per_minute: float | None
    max_cost: float | None
    max_requests: int | None
    prices: dict[str, list[float]]
    max_failed_fraction: float  # more questions left unanswered: the stage fails, writing nothing


@dataclasses.dataclass
class InferParams:
    backend: str  # vllm | transformers | openai
    # the model folder answering: runs/<profile>/pad/model, .../quantize/model, a base model ...;
    # openai backend: the served model's folder (its tokenizer cuts long prompts), or models/remote
    model: str
    questions: str
    tensor_parallel_size: int
    dtype: str
    batch_size: int
    max_model_len: int
    gpu_memory_utilization: float
    seed: int
    constrain_choices: bool  # multiple choice: one of the question's option numbers
    multiple_choice: Sampling
    other: Sampling
    constrain_number_lists: bool = False  # ranking, retrieval: distinct numbers of the question's list
    prompt_format: str | None = None  # raw | chat | alpaca (shoptune/prompts.py); null: finetune.prompt_format
    api: ApiParams | None = None  # the openai backend's API
    # vllm beyond one node (README "Scaling out"): layers split over pipeline_parallel_size stages of
    # tensor_parallel_size GPUs each; distributed_executor_backend: null (vLLM's choice: processes on
    # one node), mp, or ray (a Ray cluster started on the nodes, the stage run on its head)
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None


@dataclasses.dataclass
class EvaluateParams:
    questions: str
    embedding_model: str
    multilingual_embedding_model: str


@dataclasses.dataclass
class TinyModelParams:
    out: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    vocab_size: int
    seed: int


@dataclasses.dataclass
class HardwareParams:
    """profiles.<name>.hardware: the machines the profile is planned for. Read by `shoptune plan`
    (does the profile fit them?) and `shoptune doctor` (is this machine one of them?), by no stage:
    no stage's params in dvc.yaml name it, so changing it reruns nothing. Memory in GiB as
    nvidia-smi's memory.total and /proc/meminfo report it."""

    train_gpu_memory_gib: float | None  # each GPU finetune trains on (finetune.num_processes of them); null: the CPU
    infer_gpus: int  # GPUs vLLM shards the model over; 0: inference on the CPU
    infer_gpu_memory_gib: float | None  # each inference GPU's memory (null with infer_gpus 0)
    infer_gpu_compute_capability: float | None  # e.g. 7.5 for a T4: no bfloat16 below 8.0
    host_ram_gib: float  # the host's RAM: the largest stage must fit it
    disk_gib: float  # free disk for the base model, every stage's outputs and the DVC cache


@dataclasses.dataclass
class Profile:
    """profiles.<name>: every section, and whether its stages get GPUs."""

    gpus: bool
    synthesize: SynthesizeParams
    clean: CleanParams
    dataset: DatasetParams
    finetune: FinetuneParams
    pad: PadParams
    quantize: QuantizeParams
    infer: InferParams
    evaluate: EvaluateParams
    hardware: HardwareParams
