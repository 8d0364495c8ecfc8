"""What each process holds for a run, built from the prepared bundle, on its device.

client.py  ClientRuntime (a client process: NanoEdge, batches, image features, the split channel)
           and ClientJob (one message's work: a partition, a round, the client's own folder)
server.py  ServerSide (the server process: the LLM behind the split server, its own NanoEdge,
           the global test set)
"""
