"""Files -> preprocessing -> slice cache -> tf.data. Nothing here imports from models or later."""
