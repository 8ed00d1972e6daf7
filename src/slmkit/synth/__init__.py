"""Teacher-made instruction data (`slm synth`): Self-Instruct generation from seed tasks, ROUGE-L deduplication,
filters counted by reason, an optional step-by-step rationale before each answer, resumable output."""

from .config import RECIPE, SCHEMA, SynthConfig
from .filters import FILTERS, REASONS, Filter, rejection
from .generate import Synthesizer, derive_seed, synthesize
from .prompts import parse_answer, parse_task
from .rouge import Deduper, lcs_length, rouge_l, tokenize
from .seeds import Seed, read_seeds
from .state import partial_paths
from .teacher import Ask, ModelTeacher, Reply, Sampling, Teacher, load_teacher

__all__ = ["Ask", "Deduper", "FILTERS", "Filter", "ModelTeacher", "RECIPE", "REASONS", "Reply", "SCHEMA", "Sampling",
           "Seed", "SynthConfig", "Synthesizer", "Teacher", "derive_seed", "lcs_length", "load_teacher",
           "parse_answer", "parse_task", "partial_paths", "read_seeds", "rejection", "rouge_l", "synthesize",
           "tokenize"]
