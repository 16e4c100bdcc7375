"""BM25 retrieval over a document collection, on the `bm25s` package (an optional extra:
`pip install 'tunelab[rag]'`). Held fixed across the models a harness compares."""
from __future__ import annotations

from tunelab.errors import TunelabError
from tunelab.rag.collection import Document


def _bm25s():
    try:
        import bm25s
    except ImportError:
        raise TunelabError("retrieval needs the bm25s package: pip install 'tunelab[rag]' (or pip install bm25s)") from None
    return bm25s


class BM25Retriever:
    """Okapi BM25 (bm25s defaults: k1=1.5, b=0.75, Lucene's idf) over lower-cased word tokens with
    English stop words removed; `retrieve` returns the top-k documents per query, best first."""

    def __init__(self, documents: list[Document]):
        if not documents:
            raise TunelabError("retriever: the document collection is empty")
        bm25s = _bm25s()
        self.documents = list(documents)
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize([d.text for d in self.documents], stopwords="en", show_progress=False),
                         show_progress=False)

    def retrieve(self, queries: list[str], k: int) -> list[list[Document]]:
        bm25s = _bm25s()
        k = min(k, len(self.documents))
        tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
        ids, _ = self.index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [[self.documents[int(i)] for i in row] for row in ids]
