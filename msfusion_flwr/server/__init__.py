"""What runs on the server: strategies, fusion's callers, checkpoints, the round loop, run outputs.

* :mod:`.run`: one run (global model, strategy, rounds, evaluation, outputs);
* :mod:`.methods`: method name -> strategy and index policy;
* :mod:`.strategy`: ``SubmodelStrategy`` (every partial-training method) and metered FedAvg;
* :mod:`.feddf` and :mod:`.distillation`: FedDF's server-side ensemble distillation;
* :mod:`.nodes`: waiting for nodes, their profiles and budgets;
* :mod:`.replies`: checking replies against the plan sent;
* :mod:`.accounting`: per-round traffic and measured costs;
* :mod:`.rounds`: the round loop (Flower's ``Strategy.start``, able to begin at any round);
* :mod:`.checkpoint`: atomic checkpoints and resume;
* :mod:`.reporting`: config.json, metrics.jsonl, the final model and curves.png.
"""
