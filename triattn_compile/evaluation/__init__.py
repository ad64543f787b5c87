"""Quality evaluation of KV-compression policies against full attention (``triattn eval``).

``documents.py`` names the offline texts, ``nll.py`` runs teacher forcing in cache-sized chunks (NLL and top-1
predictions), ``agreement.py`` compares with a full-attention greedy continuation, ``retrieval.py`` builds and scores
the fact-recall probe, ``report.py`` writes the markdown tables and the plot, and ``harness.py`` runs the grid
(documents x policies x budgets) and holds the CLI entry point :func:`add_eval_parser`.
"""

from triattn_compile.evaluation.harness import EvalConfig, add_eval_parser, run_eval

__all__ = ["EvalConfig", "add_eval_parser", "run_eval"]
