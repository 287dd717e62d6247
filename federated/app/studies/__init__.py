"""Studies: a YAML grid of experiments over seeds, run and reported as one command.

`multimed-fl study NAME [--quick] --out DIR` reads experiments/studies/NAME.yaml
(federated/app/studies/spec.py), runs every (condition, seed) with the in-process engine unless the
study says otherwise (federated/app/studies/runner.py; finished runs are not run again, so an
interrupted study resumes), and writes results.csv, summary.csv / summary.md (mean +- sd over
seeds) and report.md with PNG plots (federated/app/studies/report.py).
"""
