from .datasets import EVAL_SETS, load_eval_text
from .perplexity import perplexity, token_windows

__all__ = ["EVAL_SETS", "load_eval_text", "perplexity", "token_windows"]
