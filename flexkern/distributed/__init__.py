"""Expert parallelism on torch.distributed: the experts of a FlexMoE spread over the ranks of a
process group, tokens exchanged by all-to-all (``ep``), over autograd-aware collectives
(``exchange``)."""
from .ep import (ExpertParallelMoE, all_reduce_replicated_grads, expert_parallel, expert_parameter_names,
                 expert_split, replicated_parameters, shard, to_flexmoe, unshard)
from .exchange import all_to_all

__all__ = ["ExpertParallelMoE", "all_reduce_replicated_grads", "all_to_all", "expert_parallel", "expert_parameter_names",
           "expert_split", "replicated_parameters", "shard", "to_flexmoe", "unshard"]
