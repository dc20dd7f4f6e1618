"""Bundles from models trained elsewhere: ``hashaudit import`` and ``hashaudit index``.

``checkpoint.py`` reads a checkpoint without running anything from it, ``layouts.py``
re-creates the upstream hash nets (DeepHash-pytorch and the code derived from it, torchvision)
with their exact key names, ``importer.py`` writes the hasher into a bundle, ``index.py``
encodes the user's database into its gallery (or takes precomputed codes), and ``upload.py``
does both for ``POST /models``. The API may import this package; it never imports
``service.training``.
"""
