"""The server's part of the model: the frozen LLM.

llm.py  ServerLLM: loss and d loss / d input embeddings (logits only where labelled), answer scoring
"""
