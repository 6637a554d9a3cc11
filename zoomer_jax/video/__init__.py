"""Video frames for the agent: time index, VideoZoomer's frame sampling by true time, decoding, preprocessing.

  reader = VideoReader(path)                           # backend="auto" | "cv2" | "av"; indexes every frame's time
  idx, ts = sample_overview(reader.meta)               # first-turn overview (<= 64 frames), ts: true times in s
  idx, ts = sample_zoom(reader.meta, start, end, fps)  # one <video_zoom> clip (<= 16 frames inside [start, end])
  pixel_values, image_grid_thw = preprocess_frames(reader.frames(idx))
"""

from zoomer_jax.video.meta import VideoError, VideoMeta
from zoomer_jax.video.preprocess import (budget_size, model_size, patchify, patchify_images, preprocess_frames,
                                         preprocess_video, resize_frame, smart_resize)
from zoomer_jax.video.reader import VideoReader, read_meta
from zoomer_jax.video.sampling import (frame_times, plan_runs, sample_overview, sample_zoom,
                                       zoom_frame_count)

__all__ = ["VideoError", "VideoMeta", "VideoReader", "budget_size", "frame_times", "model_size", "patchify",
           "patchify_images", "plan_runs", "preprocess_frames", "preprocess_video", "read_meta", "resize_frame",
           "sample_overview", "sample_zoom", "smart_resize", "zoom_frame_count"]
