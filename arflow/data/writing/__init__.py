"""The writer side of the data pipeline: turning an image source into a class-bucketed shard set.

Modules: ``images`` (the project's one image-file reader: extension list, folder listing and ADM's
centre crop, shared with FID reference statistics), ``sources`` (digits and ImageFolder trees as
per-class lists of loadable items), ``encoders`` (what is stored per image: pixels or SD-VAE
moments), ``build`` (sharding, checksummed atomic writes, resumable re-runs, the manifest).
``tools/make_shards.py`` is the command line over ``build.build_shards``.

The streaming side (``arflow.data.loader`` and what it uses) never imports this package.
"""
