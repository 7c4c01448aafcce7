// placeholder: replaced by scripts/gen-flatbuffers.sh
