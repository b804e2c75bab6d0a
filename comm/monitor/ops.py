"""The torch.distributed calls the recorder wraps, by name (no torch import: the master's
rules use them too)."""
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
               "all_to_all", "broadcast", "reduce", "barrier", "all_gather_object", "broadcast_object_list",
               "gather", "scatter", "reduce_scatter")
POINT_TO_POINT = ("send", "recv", "isend", "irecv")
SENDS = ("send", "isend")  # point-to-point sequence numbers count sends and receives of a pair apart
