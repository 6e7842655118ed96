"""Grad-CAM explanations (BaiNa & Joe (explainable channel attention)): heatmaps for every run and their agreement with the baseline cell."""

from prunegrid.explain.gradcam import agreement, gradcam, log_run_explanations, pearson, target_layer, top_iou

__all__ = ["agreement", "gradcam", "log_run_explanations", "pearson", "target_layer", "top_iou"]
