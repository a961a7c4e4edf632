"""detect_metrics: each kind of wrong box and each kind of lost object, on hand-made canvases."""
import torch

from detect_metrics import canvas_errors, count_errors


def t(boxes, labels):
    return {'boxes': torch.tensor(boxes, dtype=torch.float32).view(-1, 4), 'labels': torch.tensor(labels)}


def p(boxes, labels, scores):
    return {**t(boxes, labels), 'scores': torch.tensor(scores, dtype=torch.float32)}


A, B, C = [10, 10, 30, 30], [34, 10, 54, 30], [70, 70, 90, 90]  # A and B 4 px apart: crowded; C alone


def test_each_detection_kind_and_each_lost_object():
    target = t([A, B, C], [1, 2, 3])
    pred = p([A, [11, 10, 30, 30],   # correct, then the same object again: duplicate
              [10, 10, 54, 30],      # covers A and B: merged
              [70, 70, 76, 76],      # a corner of C: partial (IoU < 0.5)
              [0, 60, 8, 68]],       # nothing there: background
             [1, 1, 5, 3, 4], [0.9, 0.8, 0.7, 0.6, 0.5])
    kinds, objects, crowded = canvas_errors(pred, target)
    assert kinds == ['correct', 'duplicate', 'merged', 'partial', 'background']
    assert objects == ['found', 'merged', 'mislocalised']
    assert crowded == [True, True, False]


def test_wrong_class_and_missed_and_a_perfect_canvas():
    kinds, objects, _ = canvas_errors(p([A], [7], [0.9]), t([A, C], [1, 3]))
    assert kinds == ['wrong_class'] and objects == ['wrong_class', 'missed']
    kinds, objects, _ = canvas_errors(p([A, C], [1, 3], [0.9, 0.8]), t([A, C], [1, 3]))
    assert kinds == ['correct', 'correct'] and objects == ['found', 'found']


def test_count_errors_adds_up_and_respects_the_threshold():
    targets = [t([A, C], [1, 3]), t([A, C], [1, 3]), t([A], [1])]
    preds = [p([A, C], [1, 3], [0.9, 0.8]),                # right
             p([A, C, [0, 60, 8, 68]], [1, 3, 4], [0.9, 0.8, 0.7]),  # over: a background box
             p([A, [0, 60, 8, 68]], [1, 4], [0.9, 0.1])]   # the background box is below the threshold: right
    e = count_errors(preds, targets, threshold=0.5)
    assert e['canvases'] == {'right': 2, 'over': 1}
    assert e['detections'] == {'correct': 5, 'background': 1} and e['objects'] == 5
    assert e['wrong_count_causes'] == {'background': 1}
    e = count_errors(preds, targets, threshold=0.95)         # nothing kept: every object missed
    assert e['canvases'] == {'under': 3} and e['objects_unmatched'] == {'missed': 5}
