"""What runs on a participant's device: the ClientApp handlers and local training.

* :mod:`.participant`: the train and query handlers (narrow model in, trained narrow model out);
* :mod:`.training`: local training (CE + contrastive loss + codistillation), fresh optimizer every round;
* :mod:`.losses`: MSfusion's contrastive loss, the global feature space, codistillation;
* :mod:`.metering`: measured FLOPs and peak tensor memory;
* :mod:`.state`: the previous round's sub-model, in ``Context.state`` and optionally on disk;
* :mod:`.faults`: simulated dropouts and stragglers.
"""
