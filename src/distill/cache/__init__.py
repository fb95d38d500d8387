"""The offline teacher: `distill cache` stores a teacher's top-k targets once (sharded, checksummed, by sample
id); `teacher: {cache: DIR}` trains students from them without loading the teacher."""

from distill.cache.indexed import IndexedDataset, rows_per_sample
from distill.cache.store import TeacherCache
from distill.cache.writer import CacheWriter

__all__ = ["CacheWriter", "IndexedDataset", "TeacherCache", "rows_per_sample"]
