"""The results layer: a sweep read back (``read``), its statistics (``stats``), the leaderboard
model and views (``leaderboard``), the HTML report (``report``), tuned-default train configs
(``export``), and ``publish``, which alone writes every output. Nothing here runs training.
"""

from sweeps.results.export import export_tuned
from sweeps.results.publish import publish, run_leaderboard
from sweeps.results.read import SweepResults, load_sweep

__all__ = ["SweepResults", "export_tuned", "load_sweep", "publish", "run_leaderboard"]
