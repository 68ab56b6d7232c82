"""Before/after evaluation: does a fine-tune keep (or improve) long-context retrieval?

The suite is synthetic and RULER-style (Hsieh et al., 2024): needles, variable chains, frequent words and
fact questions hidden in shipped essays at fixed token lengths, built offline and seeded, so every
checkpoint answers the same samples and differences are paired. It measures string-match recall per task
x length, with 95% bootstrap intervals for each checkpoint and for its paired difference to the first
(the baseline), plus held-out chat perplexity as a general-quality guard.

    tasks.py       the task registry and the sample makers (and RULER's string-match scoring)
    fitting.py     a task's draft fitted to a token length in the model's chat template: the suite
    statistics.py  stratified, paired bootstrap over the suite
    calibration.py the study's cell selection from a base-model calibration run (docs/STUDY.md)
    config.py      EvalConfig
    run.py         one vLLM engine per checkpoint, the scores and the results dict
    report.py      results.json, results.md, samples.jsonl and the plots

The recipe that strings them together is ``jobs/eval.py`` (``retmask eval``).
"""
