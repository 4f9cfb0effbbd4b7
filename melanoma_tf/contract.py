"""The wire contract between the exported models and their clients: model names, signatures,
tensor keys, status codes. TF Serving and the embedded server serve exactly this; the client
and the exporters import it from here. No TensorFlow import, so a client can read it cheaply.

    lesion_segmenter     serving_default       image_bytes [N] string  -> lesion_mask, lesion_box,
                         serving_image_tensor  images [1, H, W, 3] uint8   lesion_score, masked_image,
                                                                           image_size, status
    melanoma_classifier  serving_default       masked_image [N, 227, 227, 3] uint8
                                               -> melanoma_probability, probabilities, class_id, threshold
                         explain               the same, + heat_map [N, 227, 227] float32
                         (a run with an input guard: + input_distance [N], input_status [N])
"""

SEGMENTER, CLASSIFIER = "lesion_segmenter", "melanoma_classifier"
BYTES_SIGNATURE, ARRAY_SIGNATURE = "serving_default", "serving_image_tensor"
CLASSIFIER_SIGNATURE = "serving_default"
# The classifier's second signature: its outputs and where it looked (Grad-CAM, 0-1 per image).
EXPLAIN_SIGNATURE, HEAT_MAP = "explain", "heat_map"
# The classifier's input, whichever view of the lesion it trained on (`masking.view_fn`): the
# paper's masked lesion or the lesion in its context; the segmenter's export cuts it.
MASKED_IMAGE = "masked_image"
CLASS_NAMES = ("nevus", "melanoma")  # the classifier's `probabilities` columns
# Side of the masked lesion the segmenter hands the classifier: the served classifier's input,
# whatever size the classifier computes at.
CLASSIFIER_INPUT_SIZE = 227
# Segmenter `status`: a lesion was found; none was (not classified); the image did not decode;
# the image is larger than MAX_IMAGE_PIXELS (not decoded; `image_size` gives its header's size).
STATUS_OK, STATUS_NO_LESION, STATUS_BAD_IMAGE, STATUS_TOO_LARGE = 0, 1, 2, 3
# Dermoscopy originals reach about 40 megapixels; 100 MP as RGB is 300 MB before the model runs.
MAX_IMAGE_PIXELS = 100_000_000
# The classifier's input guard (`modeling.input_guard`), in exports of runs that fitted one: the
# input's distance from the training views over the guard's threshold (> 1 refused), and why it
# was refused. A refused input's melanoma_probability is not an answer (the client gives NaN).
INPUT_DISTANCE, INPUT_STATUS = "input_distance", "input_status"
INPUT_OK, INPUT_NOT_DERMOSCOPY, INPUT_UNUSABLE = 0, 1, 2
INPUT_STATUS_NAMES = {INPUT_NOT_DERMOSCOPY: "not_dermoscopy", INPUT_UNUSABLE: "unusable"}
# TF Serving replays these Predict requests when it loads a version (--enable_model_warmup).
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
