"""Fits beside other CPU-bound processes (issue 14): the InstEval-sized and the seed's crossed fit with 0, 1 and 2
`while True: pass` loops running, started in setup and killed in teardown. The times should stay within ~1.5x of
the quiet ones (threads go only to free cores: sparsemix/core/threads.py). Side by side with lme4:
asv_bench/compare/load/run.py."""

import subprocess
import sys
import time

import sparsemix
from sparsemix.datasets import generate_insteval_like, seed_datasets

from .scale import INSTEVAL_FORMULA


class FitUnderLoad:
    params = [["insteval", "seed_crossed"], [0, 1, 2]]
    param_names = ["design", "busy"]
    timeout = 900

    def setup(self, design, busy):
        if design == "insteval":
            self.data, self.formula = generate_insteval_like(), INSTEVAL_FORMULA
        else:
            self.data, self.formula = seed_datasets()[1], "y ~ 1 + (1 | group1) + (1 | group2)"
        self.loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        time.sleep(0.5)

    def teardown(self, design, busy):
        for p in self.loops:
            p.kill()
            p.wait()

    def time_fit(self, design, busy):
        sparsemix.lmer(self.formula, self.data)
