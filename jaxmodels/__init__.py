"""jaxmodels: Flax linen layers and models used as pure functions, Optax optimizers, and the shared core
(pytree utilities, sharding helpers, checkpoint I/O) that `merging` and `quant` build on."""

__version__ = "0.2.0"  # the one version of the weightlab distribution (pyproject.toml reads it; see CHANGELOG.md)

from jaxmodels import io, sharding, tree
from jaxmodels import capture, datasets, layers, models, optim, train
from jaxmodels import selection  # exact k-th largest / top-k mask (import jaxmodels.selection)
from jaxmodels import atomic, progress  # crash-safe overwrites (AtomicOutput); the one progress bar (progress_bar)
from jaxmodels import adapters  # LoRA / rsLoRA / DoRA, QLoRA hook, PEFT files (import jaxmodels.adapters)
from jaxmodels import perplexity, text  # GPTQ/AWQ window perplexity; bundled corpus + HF tokenizers
from jaxmodels import runtime  # platform detection; CPU-only virtual devices for notebooks, tests and benches
from jaxmodels import analysis  # HT-SR / FARMS weight spectra, neural collapse, data diet (import jaxmodels.analysis)
from jaxmodels.perplexity import evaluate_perplexity
from jaxmodels.io import (
    CheckpointError,
    iter_safetensors,
    load_safetensors,
    restore_checkpoint,
    save_checkpoint,
    save_safetensors,
)
from jaxmodels.sharding import make_mesh, rules_to_shardings, shard, jit_sharded
from jaxmodels.tree import (
    check_compatible,
    flatten,
    unflatten,
    select,
    filter_paths,
    map_with_path,
    compute_in_float32,
    tree_bytes,
)

__all__ = [
    "io", "sharding", "tree", "adapters", "capture", "datasets", "layers", "models", "optim", "train",
    "CheckpointError", "iter_safetensors", "load_safetensors", "restore_checkpoint", "save_checkpoint",
    "save_safetensors", "make_mesh", "rules_to_shardings", "shard", "jit_sharded", "check_compatible", "flatten",
    "unflatten", "select", "filter_paths", "map_with_path", "compute_in_float32", "tree_bytes",
    "perplexity", "text", "evaluate_perplexity", "runtime", "analysis", "selection", "atomic", "progress",
]
