"""The parsers of ``sr cloud ...`` (training on SkyPilot, batch on a Ray cluster,
``doctor`` to check a project first), one function per action. Handlers import infra
inside, so ``sr --help`` stays instant.

Every ``sr cloud`` command that would call a cloud tool writes what it generated and
the exact commands into an output folder and prints them; with ``--dry-run`` it stops
there, without it checks for the tool and Google Cloud credentials (local files only)
before running anything, so a machine without them fails in a second with one line.
"""

from __future__ import annotations

import argparse

from infra.outfolder import DEFAULT_OUT


def _add_out_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="write the generated files and print the commands; contact no cloud")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"folder for the generated files and commands.sh (default: {DEFAULT_OUT}/<name>/)")


def add_cloud_parser(sub: argparse._SubParsersAction) -> None:
    cloud = sub.add_parser(
        "cloud",
        help="submit training to GPU VMs (SkyPilot) and batch upscaling to a Ray cluster on Google Cloud",
        description="Google Cloud submission. Training runs as a SkyPilot managed job (relaunched after a "
                    "spot preemption or an error of its own, resuming from the run's newest checkpoint); batch "
                    "upscaling runs on a cluster made by Ray's cluster launcher. `sr cloud doctor` checks a "
                    "project first. See docs/CLOUD.md.",
    )
    cloud_sub = cloud.add_subparsers(dest="cloud_command", metavar="ACTION")
    cloud_sub.required = True
    for add_action in (_add_train, _add_job_actions, _add_gpu_check, _add_ray_config, _add_doctor, _add_batch):
        add_action(cloud_sub)


def _add_train(cloud_sub: argparse._SubParsersAction) -> None:
    p = cloud_sub.add_parser(
        "train",
        help="submit `sr train` to V100 VMs as a SkyPilot managed job",
        description="Write a SkyPilot task that installs the project (torch with V100 kernels) on every "
                    "VM and runs `accelerate launch -m jobs.train ARGS --resume auto "
                    "train.run_dir=BUCKET/runs/NAME` across the nodes, then submit it with "
                    "`sky jobs launch`. Config arguments are those of `sr train`.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [section.field=value ...]",
                   help="the training config file (optional, local or gs://) and dotted overrides, as for `sr train` "
                        "(before or after the options, the overrides together)")
    p.add_argument("--preset", default="", help="config preset, as for `sr train` (default: none)")
    p.add_argument("--name", required=True, help="run name: the managed job's name and BUCKET/runs/NAME")
    p.add_argument("--bucket", required=True, help="gs://BUCKET[/prefix] that holds runs/")
    p.add_argument("--nodes", type=int, default=1, help="number of VMs (default: 1)")
    p.add_argument("--gpus", default="V100:1", help="accelerators per VM as TYPE:COUNT (default: V100:1)")
    p.add_argument("--spot", action="store_true", help="use spot VMs (relaunched and resumed after preemption)")
    p.add_argument("--region", default="", help="GCP region (default: SkyPilot picks the cheapest with capacity)")
    p.add_argument("--zone", default="", help="GCP zone (default: any in the region)")
    p.add_argument("--disk-size", type=int, default=100, help="boot disk per VM in GB (default: 100)")
    p.add_argument("--no-local-ssd", dest="local_ssd", action="store_false",
                   help="cache shards on the boot disk instead of a 375 GB local NVMe SSD")
    p.add_argument("--image", default="",
                   help="run in this Docker image, e.g. docker:us-central1-docker.pkg.dev/P/sr/sr-cloud:0.1.0 "
                        "(default: SkyPilot's GPU VM image). Artifact Registry images are pulled with the VMs' "
                        "service account; for another private registry export SKYPILOT_DOCKER_USERNAME and "
                        "SKYPILOT_DOCKER_PASSWORD first")
    p.add_argument("--launch-config", default="",
                   help="accelerate config file in the project, e.g. jobs/launch/deepspeed_zero2_8_gpus.yaml "
                        "(default: none); refused when it cannot use the GPUs asked for")
    p.add_argument("--max-restarts-on-errors", type=int, default=None, metavar="N",
                   help="restart the job up to N times after it fails by itself (storage outage, NCCL timeout, "
                        "out of memory), resuming from its newest checkpoint (default: 3); preemptions always "
                        "relaunch")
    _add_out_options(p)
    p.set_defaults(func=run_train)


def _add_job_actions(cloud_sub: argparse._SubParsersAction) -> None:
    for action, text in (("status", "show the managed job's state (SkyPilot's job queue)"),
                         ("logs", "follow the managed job's output"),
                         ("stop", "cancel the managed job (its checkpoints stay in the bucket)")):
        p = cloud_sub.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("name", metavar="RUN", help="the run name given to `sr cloud train --name`")
        if action == "logs":
            p.add_argument("--no-follow", dest="follow", action="store_false", help="print the log so far and exit")
            p.add_argument("--controller", action="store_true",
                           help="the controller's log: provisioning, preemptions and recoveries")
        _add_out_options(p)
        p.set_defaults(func=run_job_command, action=action)


def _add_gpu_check(cloud_sub: argparse._SubParsersAction) -> None:
    p = cloud_sub.add_parser(
        "gpu-check",
        help="run ./dev gpu-check (every CUDA path, a Markdown table) on one GPU VM, deleted when it ends",
        description="Write a SkyPilot task that installs the project on one GPU VM (torch with V100 kernels, "
                    "as `sr cloud train` does) and runs the GPU check there, then start it with `sky launch "
                    "--down` (the VM is deleted when the check ends). The table is printed in the log and "
                    "written to --table.",
    )
    p.add_argument("--gpus", default="V100:1", help="accelerators of the VM as TYPE:COUNT (default: V100:1)")
    p.add_argument("--spot", action="store_true", help="a spot VM")
    p.add_argument("--region", default="", help="GCP region (default: SkyPilot picks the cheapest with capacity)")
    p.add_argument("--table", default="gpu-check.md",
                   help="where the check writes its table on the VM; a gs:// URL keeps it after the VM is deleted "
                        "(default: gpu-check.md on the VM, in the log only)")
    _add_out_options(p)
    p.set_defaults(func=run_gpu_check)


def _add_ray_config(cloud_sub: argparse._SubParsersAction) -> None:
    p = cloud_sub.add_parser(
        "ray-config",
        help="print a Ray cluster-launcher config for GCP GPU workers (use: > cluster.yaml)",
        description="Print a Ray cluster-launcher YAML for Google Cloud: a CPU head node and an autoscaling "
                    "pool of GPU workers whose setup installs the project (torch with V100 kernels). "
                    "It contacts nothing; `sr cloud batch --cluster` uses the file.",
    )
    p.add_argument("--project", default="",
                   help="GCP project id (default: gcloud's, from `gcloud config set project`)")
    p.add_argument("--name", default="sr-batch", help="cluster name (default: sr-batch)")
    p.add_argument("--region", default="us-central1", help="GCP region (default: us-central1)")
    p.add_argument("--zone", default="us-central1-a", help="GCP zone with the GPUs (default: us-central1-a)")
    p.add_argument("--gpu", default="nvidia-tesla-v100", help="GCP accelerator type (default: nvidia-tesla-v100)")
    p.add_argument("--gpus-per-worker", type=int, default=1, help="GPUs per worker VM: 1, 2, 4 or 8 (default: 1)")
    p.add_argument("--cpus-per-gpu", type=int, default=8, help="vCPUs per GPU on workers (default: 8)")
    p.add_argument("--min-workers", type=int, default=0, help="workers kept while idle (default: 0)")
    p.add_argument("--max-workers", type=int, default=4, help="most workers the autoscaler starts (default: 4)")
    p.add_argument("--spot", action="store_true", help="spot GPU workers")
    p.add_argument("--disk-gb", type=int, default=200, help="boot disk per node in GB (default: 200)")
    p.add_argument("--source-image", default=None, help="VM image of the nodes (default: a Deep Learning VM family)")
    p.add_argument("--image", default="",
                   help="run the nodes inside this Docker image (default: none); an Artifact Registry image is "
                        "pulled with the nodes' service account")
    p.add_argument("--service-account", default="", metavar="EMAIL",
                   help="service account of the GPU workers (default: Ray's ray-autoscaler-sa-v1@PROJECT, "
                        "which `ray up` creates with roles/storage.objectAdmin)")
    p.add_argument("-o", "--output", default="-", help="write the YAML here (default: standard output)")
    p.set_defaults(func=run_ray_config)


def _add_doctor(cloud_sub: argparse._SubParsersAction) -> None:
    p = cloud_sub.add_parser(
        "doctor",
        help="check a Google Cloud project before launching: APIs, quotas, rights, service accounts, bucket, image",
        description="Check, with your application-default credentials and without changing anything, what "
                    "the training shape (--nodes/--gpus/--spot) and the batch cluster (--cluster) need: the "
                    "APIs enabled, the Compute Engine quotas (regional and all-regions) against the VMs SkyPilot "
                    "and Ray would create, the GPUs offered in the zones, your rights to create service accounts "
                    "and grant roles, the VMs' service accounts and their roles, the bucket's region against the "
                    "VMs', and that the image can be pulled. Each failed check prints its fix. Exit codes: 0 all "
                    "passed, 1 some failed, 2 no credentials or bad arguments, 75 Google's APIs unreachable.",
    )
    p.add_argument("--project", default="", help="GCP project id (default: the cluster config's, else gcloud's)")
    p.add_argument("--region", default="", help="region of the training VMs (default: the cluster's, else us-central1)")
    p.add_argument("--zone", default="", help="zone of the training VMs (default: any in the region)")
    p.add_argument("--bucket", default="", help="gs://BUCKET the jobs read and write (default: not checked)")
    p.add_argument("--nodes", type=int, default=1, help="training VMs, as for `sr cloud train` (default: 1)")
    p.add_argument("--gpus", default="V100:1", help="accelerators per training VM (default: V100:1)")
    p.add_argument("--spot", action="store_true", help="spot training VMs")
    p.add_argument("--disk-size", type=int, default=100, help="boot disk per training VM in GB (default: 100)")
    p.add_argument("--no-local-ssd", dest="local_ssd", action="store_false", help="training VMs without local SSD")
    p.add_argument("--no-train", dest="train", action="store_false", help="check the batch cluster only")
    p.add_argument("--cluster", default="", metavar="CLUSTER.yaml",
                   help="a Ray cluster config from `sr cloud ray-config` (default: no batch cluster)")
    p.add_argument("--image", default="", help="the training image (--image of `sr cloud train`); the cluster's "
                                               "image is read from CLUSTER.yaml")
    p.add_argument("--dry-run", action="store_true", help="print what would be checked; contact nothing")
    p.set_defaults(func=run_doctor)


def _add_batch(cloud_sub: argparse._SubParsersAction) -> None:
    p = cloud_sub.add_parser(
        "batch",
        help="run `sr batch` on a Ray cluster (ray up when needed, then ray job submit)",
        description="Start the cluster described by CLUSTER (Ray's cluster launcher) unless it is up, "
                    "forward its job server to 127.0.0.1, and submit `sr batch INPUT OUTPUT --model M "
                    "--address auto [--batch-args]` with this checkout as the job's working dir.",
    )
    p.add_argument("input", metavar="INPUT", help="bucket prefix of the images, e.g. gs://in/photos")
    p.add_argument("output", metavar="OUTPUT", help="bucket prefix for the results, e.g. gs://out/photos")
    p.add_argument("--model", required=True, help="model file the cluster can read, e.g. gs://models/x4.safetensors")
    p.add_argument("--cluster", required=True, metavar="CLUSTER.yaml", help="from `sr cloud ray-config`")
    p.add_argument("--batch-args", default="", metavar="'OPTIONS'",
                   help="more options of `sr batch` as one string after '=', e.g. --batch-args='--overwrite --limit 1000' "
                        "(default: none)")
    p.add_argument("--submission-id", default="", help="Ray job submission id (default: sr-batch-<UTC time>)")
    p.add_argument("--generator", default="rrdbnet",
                   choices=["rrdbnet", "multihead_rrdbnet", "srresnet", "srvgg_compact"],
                   help="the model's architecture: sizes the CPUs of each GPU actor from the cost per output "
                        "megapixel (docs/BATCH.md; default: rrdbnet)")
    _add_out_options(p)
    p.set_defaults(func=run_batch)


# --- handlers: each calls one function of infra ---------------------------------------


def run_train(args: argparse.Namespace) -> int:
    from infra.training import submit_train

    return submit_train(
        args.items, out=args.out, dry_run=args.dry_run, max_restarts_on_errors=args.max_restarts_on_errors,
        name=args.name, bucket=args.bucket, preset=args.preset, nodes=args.nodes, gpus=args.gpus, spot=args.spot,
        region=args.region, zone=args.zone, disk_size=args.disk_size, local_ssd=args.local_ssd, image_id=args.image,
        launch_config=args.launch_config,
    )


def run_job_command(args: argparse.Namespace) -> int:
    from infra.training import job_action

    return job_action(args.action, args.name, follow=getattr(args, "follow", True),
                      controller=getattr(args, "controller", False), out=args.out, dry_run=args.dry_run)


def run_gpu_check(args: argparse.Namespace) -> int:
    from infra.training import submit_gpu_check

    return submit_gpu_check(args.gpus, args.spot, args.region, args.table, out=args.out, dry_run=args.dry_run)


def run_ray_config(args: argparse.Namespace) -> int:
    from infra.raysubmit import write_ray_config

    write_ray_config(
        args.output, project_id=args.project, source_image=args.source_image, region=args.region, zone=args.zone,
        name=args.name, gpu=args.gpu, gpus_per_worker=args.gpus_per_worker, cpus_per_gpu=args.cpus_per_gpu,
        min_workers=args.min_workers, max_workers=args.max_workers, spot=args.spot, disk_gb=args.disk_gb,
        docker_image=args.image, worker_service_account=args.service_account,
    )
    return 0


def run_batch(args: argparse.Namespace) -> int:
    from infra.raysubmit import submit_batch

    return submit_batch(args.input, args.output, args.model, args.cluster, args.sr_parser,
                        batch_args=args.batch_args, submission_id=args.submission_id, generator=args.generator,
                        out=args.out, dry_run=args.dry_run)


def run_doctor(args: argparse.Namespace) -> int:
    from infra.doctor.run import check_project

    return check_project(
        dry_run=args.dry_run, project=args.project, region=args.region, zone=args.zone, bucket=args.bucket,
        train=args.train, nodes=args.nodes, gpus=args.gpus, spot=args.spot, disk_size=args.disk_size,
        local_ssd=args.local_ssd, cluster_path=args.cluster, image_ref=args.image,
    )
