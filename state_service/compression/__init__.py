"""Context compression: what GetContext sends when the log outgrows the budget.

- strategies.py  the five strategies as pure functions (budget, turn and tool
                 call boundaries enforced here)
- summarizer.py  extractive (offline) and LLM (OpenAI-compatible) summarizers,
                 folded incrementally; fit_summary cuts one to a budget share
- bm25.py        incremental Okapi BM25; memory.py keeps one index per session
                 in process, caught up from Redis, with optional embeddings
                 (embeddings.py) for hybrid scores
- worker.py      the background summarizer: off the request path, committed
                 with a compare-and-set on "covered up to" in Redis
- engine.py      builds the parts from the settings for the GetContext pipeline
                 (context.py); the stored numbers of a strategy setting

Nothing here changes the log: summaries live beside it (storage/redis.py).
"""

from state_service.compression.strategies import Shares, Strategy

__all__ = ["Shares", "Strategy"]
