"""The toy lab's code: `python -m experiments.toy.lab --help` from the repository's root (cli.py lists the
commands). Its modules import one another without a circle: study <- chains <- study_report <- stages, with
runs.py and stats.py below them; experiment, pretrain and evaluator_training stand apart."""
