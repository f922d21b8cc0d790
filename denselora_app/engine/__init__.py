"""The training engine: a RunConfig's data (sources -> formats -> data), its model (models), its adapter
(methods, with the method in denselora/), the memory it needs (memory), the recipe (train), the process that runs it
(worker), the learning-rate finder (lr_finder), and launch, the one way every front end starts a run."""
