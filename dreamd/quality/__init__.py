"""Quality: the dream measured as a viewer sees it, on small copies of the frames (numpy
and scikit-image, no model, no torch). metrics.py computes (motion, flicker, the pop at
a keyframe boundary, a keyframe's colour in CIELAB and its change), recorder.py stores
the numbers in the ledger's `quality` table from the keyframe and interpolation workers.
"""
