"""Object detection: YOLOv5 detectors, their loss and label assignment, NMS and mAP.

The architecture follows the published YOLOv5 model definitions (Jocher et al., Ultralytics
YOLOv5, release v7.0: depth and width multiples, anchors, C3, SPPF, PANet neck, Detect head);
it is written here under this project's MIT licence rather than imported from the GPL-3.0
``yolov5`` package (which also pulls the AGPL-3.0 ``ultralytics``), and checked against the
published parameter counts. Nothing in :mod:`prunegrid` imports this package unless a detection
cell runs.
"""
