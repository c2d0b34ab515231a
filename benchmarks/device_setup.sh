# Source on the device machine (after carrying .devcarry/, made by pack_ray_for_device.sh):
# unpacks Ray and the wheels into /tmp/site and puts them and the repo on PYTHONPATH.
mkdir -p /tmp/site && tar xJf .devcarry/ray-slim.tar.xz -C /tmp/site && \
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devcarry/deps/*.whl
export PYTHONPATH=/tmp/site:$PWD
