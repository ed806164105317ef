"""Write a small TensorBoard log (a falling loss over 20 steps) with TensorBoard's own event
writer, so its dashboard has a scalar to show."""

import sys
import time

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

writer = EventFileWriter(sys.argv[1] if len(sys.argv) > 1 else "tb-logs")
for step in range(20):
    value = Summary.Value(tag="loss", simple_value=1.0 / (step + 1))
    writer.add_event(Event(step=step, wall_time=time.time(), summary=Summary(value=[value])))
writer.close()
print("wrote tensorboard logs")
