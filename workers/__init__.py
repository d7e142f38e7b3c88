"""Everything that touches torch: model loading, the paged KV cache, the model runner, the sampler.

Nothing here imports ray, grpc or the cluster package; `ModelWorker` is a plain class that the
cluster turns into a Ray actor in one place.
"""
