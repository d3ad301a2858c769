"""Expert offloading: experts live in an offload store and are pulled into a bounded cache on demand.

cache.py holds the eviction policies and the capacity-bounded `ExpertCache` they drive (policy, no bytes).
"""
