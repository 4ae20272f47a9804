"""MSfusion (Xie & Li, 2024) and partial-training baselines on Flower.

* :mod:`.apps`: the Flower boundary (ServerApp, ClientApp, ``run_experiment``), where the run config is resolved;
* :mod:`.config`: the run config's keys, validation and typed settings;
* :mod:`.protocol`: what travels between server and devices;
* :mod:`.engine`: the splitting engine: width groups, index policies (one per method), slicing, fusion;
* :mod:`.models`: models with declared width groups, buildable at any width;
* :mod:`.data`: datasets and federated partitions;
* :mod:`.server`: strategies, the round loop, checkpoints and run outputs;
* :mod:`.device`: the ClientApp handlers and local training (what runs on a participant);
* :mod:`.experiments`: the comparison harness and an in-process Grid;
* :mod:`.deployment`: running Flower's deployment engine on loopback (certificates, processes, the run).

docs/architecture.md maps every concept to its module.
"""

__version__ = "0.1.0"
