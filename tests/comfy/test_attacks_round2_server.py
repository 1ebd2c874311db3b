"""Attacks of the second security round against the session's launched ComfyUI 0.3.75: what a
recipe from outside may use (every node type its check accepts, reviewed by hand and pinned), and
a recipe that steers a model loader's choice through a link."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from discomfort import Run
from discomfort.errors import NodeExecutionError, PromptValidationError, UnknownRunError
from discomfort.recipes import Recipe, RecipeError, types_digest
from discomfort.remote import RemoteContext
from test_attacks_recipes import USE

pytestmark = pytest.mark.comfy

HERE = Path(__file__).resolve().parent
T = 60  # seconds a prompt may take

# Every node type of ComfyUI 0.3.75 (api nodes left out, audio nodes included) that a recipe from
# outside may use, reviewed by hand: none reads or writes a file a value names (model loaders
# choose from the server's model folders, from a list), none is an output or reaches the network.
# A ComfyUI that adds a node type the check accepts fails here until someone has looked at it.
REVIEWED = frozenset("""
    APG AddNoise AddTextPrefix AddTextSuffix AdjustBrightness AdjustContrast AlignYourStepsScheduler
    AudioAdjustVolume AudioConcat AudioEncoderEncode AudioEncoderLoader AudioMerge BasicGuider BasicScheduler
    BetaSamplingScheduler CFGGuider CFGNorm CFGZeroStar CLIPAttentionMultiply CLIPLoader CLIPMergeAdd
    CLIPMergeSimple CLIPMergeSubtract CLIPSetLastLayer CLIPTextEncode CLIPTextEncodeControlnet
    CLIPTextEncodeFlux CLIPTextEncodeHiDream CLIPTextEncodeHunyuanDiT CLIPTextEncodeLumina2
    CLIPTextEncodePixArtAlpha CLIPTextEncodeSD3 CLIPTextEncodeSDXL CLIPTextEncodeSDXLRefiner CLIPVisionEncode
    CLIPVisionLoader Canny CaseConverter CenterCropImages CheckpointLoader CheckpointLoaderSimple
    ChromaRadianceOptions CombineHooks2 CombineHooks4 CombineHooks8 ConditioningAverage ConditioningCombine
    ConditioningConcat ConditioningSetArea ConditioningSetAreaPercentage ConditioningSetAreaPercentageVideo
    ConditioningSetAreaStrength ConditioningSetDefaultCombine ConditioningSetMask ConditioningSetProperties
    ConditioningSetPropertiesAndCombine ConditioningSetTimestepRange ConditioningStableAudio
    ConditioningTimestepsRange ConditioningZeroOut ContextWindowsManual ControlNetApply ControlNetApplyAdvanced
    ControlNetApplySD3 ControlNetInpaintingAliMamaApply ControlNetLoader CosmosImageToVideoLatent
    CosmosPredict2ImageToVideoLatent CreateHookKeyframe CreateHookKeyframesFromFloats
    CreateHookKeyframesInterpolated CreateHookLora CreateHookLoraModelOnly CreateHookModelAsLora
    CreateHookModelAsLoraModelOnly CreateVideo CropMask DiffControlNetLoader DifferentialDiffusion
    DiffusersLoader DisableNoise DualCFGGuider DualCLIPLoader EasyCache EmptyAceStepLatentAudio EmptyAudio
    EmptyChromaRadianceLatentImage EmptyCosmosLatentVideo EmptyFlux2LatentImage EmptyHunyuanImageLatent
    EmptyHunyuanLatentVideo EmptyHunyuanVideo15Latent EmptyImage EmptyLTXVLatentVideo EmptyLatentAudio
    EmptyLatentHunyuan3Dv2 EmptyLatentImage EmptyMochiLatentVideo EmptySD3LatentImage 
    ExponentialScheduler ExtendIntermediateSigmas FeatherMask FlipSigmas Flux2Scheduler FluxDisableGuidance
    FluxGuidance FluxKontextImageScale FluxKontextMultiReferenceLatentMethod FreSca FreeU FreeU_V2 GITSScheduler
    GLIGENLoader GLIGENTextBoxApply GetImageSize GetVideoComponents GrowMask Hunyuan3Dv2Conditioning
    Hunyuan3Dv2ConditioningMultiView HunyuanImageToVideo HunyuanRefinerLatent HunyuanVideo15ImageToVideo
    HunyuanVideo15LatentUpscaleWithModel HunyuanVideo15SuperResolution HyperTile HypernetworkLoader
    ImageAddNoise ImageBatch ImageBlend ImageBlur ImageColorToMask ImageCompositeMasked ImageCrop
    ImageDeduplication ImageFlip ImageFromBatch ImageGrid ImageInvert ImageOnlyCheckpointLoader
    ImagePadForOutpaint ImageQuantize ImageRGBToYUV ImageRotate ImageScale ImageScaleBy ImageScaleToMaxDimension
    ImageScaleToTotalPixels ImageSharpen ImageStitch ImageToMask ImageUpscaleWithModel ImageYUVToRGB
    InpaintModelConditioning InstructPixToPixConditioning InvertMask JoinImageWithAlpha KSampler
    KSamplerAdvanced KSamplerSelect KarrasScheduler LTXVAddGuide LTXVConditioning LTXVCropGuides LTXVImgToVideo
    LTXVPreprocess LTXVScheduler LaplaceScheduler LatentAdd LatentApplyOperation LatentApplyOperationCFG
    LatentBatch LatentBatchSeedBehavior LatentBlend LatentComposite LatentCompositeMasked LatentConcat
    LatentCrop LatentCut LatentFlip LatentFromBatch LatentInterpolate LatentMultiply LatentOperationSharpen
    LatentOperationTonemapReinhard LatentRotate LatentSubtract LatentUpscale LatentUpscaleBy
    LatentUpscaleModelLoader LazyCache LoraLoader LoraLoaderModelOnly LoraModelLoader LotusConditioning Mahiro
    MakeTrainingDataset MaskComposite MaskToImage MergeImageLists MergeTextLists ModelComputeDtype ModelMergeAdd
    ModelMergeAuraflow ModelMergeBlocks ModelMergeCosmos14B ModelMergeCosmos7B ModelMergeCosmosPredict2_14B
    ModelMergeCosmosPredict2_2B ModelMergeFlux1 ModelMergeLTXV ModelMergeMochiPreview ModelMergeQwenImage
    ModelMergeSD1 ModelMergeSD2 ModelMergeSD35_Large ModelMergeSD3_2B ModelMergeSDXL ModelMergeSimple
    ModelMergeSubtract ModelMergeWAN2_1 ModelPatchLoader ModelSamplingAuraFlow ModelSamplingContinuousEDM
    ModelSamplingContinuousV ModelSamplingDiscrete ModelSamplingFlux ModelSamplingLTXV ModelSamplingSD3
    ModelSamplingStableCascade Morphology NormalizeImages OptimalStepsScheduler PairConditioningCombine
    PairConditioningSetDefaultCombine PairConditioningSetProperties PairConditioningSetPropertiesAndCombine
    PatchModelAddDownscale PerpNeg PerpNegGuider PerturbedAttentionGuidance PhotoMakerEncode PhotoMakerLoader
    PolyexponentialScheduler PorterDuffImageComposite PrimitiveBoolean PrimitiveFloat PrimitiveInt
    PrimitiveString PrimitiveStringMultiline QuadrupleCLIPLoader QwenImageDiffsynthControlnet RandomCropImages
    RandomNoise RebatchImages RebatchLatents ReferenceLatent RenormCFG RepeatImageBatch RepeatLatentBatch
    ReplaceText RescaleCFG ResizeAndPadImage ResizeImagesByLongerEdge ResizeImagesByShorterEdge SDTurboScheduler
    SD_4XUpscale_Conditioning SV3D_Conditioning SVD_img2vid_Conditioning SamplerCustom SamplerCustomAdvanced
    SamplerDPMAdaptative SamplerDPMPP_2M_SDE SamplerDPMPP_2S_Ancestral SamplerDPMPP_3M_SDE SamplerDPMPP_SDE
    SamplerER_SDE SamplerEulerAncestral SamplerEulerAncestralCFGPP SamplerEulerCFGpp SamplerLCMUpscale
    SamplerLMS SamplerSASolver SamplingPercentToSigma ScaleROPE SelfAttentionGuidance SetClipHooks SetFirstSigma
    SetHookKeyframes SetLatentNoiseMask SetUnionControlNetType ShuffleDataset ShuffleImageTextDataset
    SkipLayerGuidanceDiT SkipLayerGuidanceDiTSimple SkipLayerGuidanceSD3 SolidMask SplitAudioChannels
    SplitImageWithAlpha SplitSigmas SplitSigmasDenoise StableCascade_EmptyLatentImage
    StableCascade_StageB_Conditioning StableCascade_StageC_VAEEncode StableCascade_SuperResolutionControlnet
    StableZero123_Conditioning StableZero123_Conditioning_Batched StringCompare StringConcatenate StringContains
    StringLength StringReplace StringSubstring StringTrim StripWhitespace StyleModelApply StyleModelLoader
    T5TokenizerOptions TCFG TemporalScoreRescaling TextEncodeAceStepAudio TextEncodeHunyuanVideo_ImageToVideo
    TextEncodeQwenImageEdit TextEncodeQwenImageEditPlus TextToLowercase TextToUppercase ThresholdMask
    TomePatchModel TorchCompileModel TrainLoraNode TrimAudioDuration TrimVideoLatent TripleCLIPLoader
    TruncateText UNETLoader UNetCrossAttentionMultiply UNetSelfAttentionMultiply UNetTemporalAttentionMultiply
    USOStyleReference UpscaleModelLoader VAEDecode VAEDecodeAudio VAEDecodeHunyuan3D VAEDecodeTiled VAEEncode
    VAEEncodeAudio VAEEncodeForInpaint VAEEncodeTiled VAELoader VPScheduler VideoLinearCFGGuidance
    VideoTriangleCFGGuidance VoxelToMesh VoxelToMeshBasic Wan22FunControlToVideo Wan22ImageToVideoLatent
    WanAnimateToVideo WanCameraEmbedding WanCameraImageToVideo WanContextWindowsManual WanFirstLastFrameToVideo
    WanFunControlToVideo WanFunInpaintToVideo WanHuMoImageToVideo WanImageToVideo WanPhantomSubjectToVideo
    WanSoundImageToVideo WanSoundImageToVideoExtend WanTrackToVideo WanVaceToVideo unCLIPCheckpointLoader
    unCLIPConditioning wanBlockSwap
""".split()) | {"Epsilon Scaling"}


def test_the_node_types_a_recipe_from_outside_may_use_are_reviewed(server):
    """The check on this server's /object_info accepts no type outside the reviewed list, and
    refuses every file reader and writer of it, Load* or not."""
    from discomfort.recipes import _refused_type

    info = server.object_info()
    accepted = {c for c, i in info.items() if not _refused_type(c, i) and not c.startswith("DiscomfortTest")}
    assert accepted - REVIEWED == set(), f"review these node types before recipes may use them: {accepted - REVIEWED}"
    assert len(accepted) > 300  # the list is this ComfyUI's, not an empty one
    for cls in ("LoadImage", "LoadImageMask", "LoadImageOutput", "LoadLatent", "LoadVideo", "Load3D", "WebcamCapture",
                "LoadImageDataSetFromFolder", "LoadTrainingDataset", "SaveLatent", "SaveImage", "SaveWEBM",
                "SaveAnimatedPNG", "CheckpointSave", "DiscomfortDataLoader", "DiscomfortPort"):
        assert _refused_type(cls, info[cls]), cls
    for cls in ("RegexMatch", "RegexExtract", "RegexReplace"):  # freezes the server (re holds the GIL)
        assert "regular expression" in _refused_type(cls, info[cls])


def test_a_recipe_cannot_steer_a_loader_choice_through_a_link(server, tmp_path):
    """ComfyUI checks a combo against its list only when it is a literal: linked from a node of
    any type (a port: what a recipe's input becomes), DiffusersLoader's model_path ran with
    "../../../../tmp/..." and joined it to the models folder (it then looked for a model there).
    The same through a recipe from a hostile server (its value under another key) is refused."""
    outside = tmp_path / "outside"
    (outside / "unet").mkdir(parents=True)
    escape = "../" * 16 + str(outside).lstrip("/")
    linked = {"1": {"class_type": "PrimitiveString", "inputs": {"value": escape}},
              "2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "p", "input_data": ["1", 0]}},
              "3": {"class_type": "DiffusersLoader", "inputs": {"model_path": ["2", 0]}},
              "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}}
    with pytest.raises(NodeExecutionError) as ran:  # validated, and run with the path
        server.execute(linked, timeout=T)
    assert "DiffusersLoader" in str(ran.value)
    literal = {"3": {"class_type": "DiffusersLoader", "inputs": {"model_path": escape}},
               "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}}
    with pytest.raises(PromptValidationError):  # the control: a literal is checked against the list
        server.execute(literal, timeout=T)

    # The same through a hostile second server (a process of its own): its "model" is that
    # recipe, its "p" the path; the orchestrator makes the recipe explicitly and passes p on.
    info = server.object_info()
    sent = {"model": {"discomfort_recipe": 1, "key": "model", "output": ["3", 0], "inputs": {"p": {"key": "p"}},
                      "nodes": {"2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "p"}},
                                "3": {"class_type": "DiffusersLoader", "inputs": {"model_path": ["2", 0]}}},
                      "types": types_digest({"DiffusersLoader"}, info)},
            "p": escape}
    proc = subprocess.Popen([sys.executable, str(HERE / "_hostile_recipe_server.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdin.write(json.dumps(sent) + "\n")
        proc.stdin.flush()
        with RemoteContext(f"http://127.0.0.1:{int(proc.stdout.readline())}") as rc:
            got = {k: rc.load(k) for k in sent}
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    with Run(server, transport="shm") as run:
        with pytest.raises(RecipeError, match=r"node 3 \(DiffusersLoader\) gets its choice 'model_path' through a link"):
            run.execute(USE, {"model": Recipe.from_json(got["model"]), "p": got["p"]}, timeout=T)


@pytest.fixture(scope="module")
def short_ttl_server(comfy_path, tmp_path_factory):
    """A ComfyUI of its own whose HTTP runs end after 2 s unused, and its log."""
    import os

    from discomfort.comfy import launch_server

    from conftest import NODE_PACK, TEST_PACK

    work = tmp_path_factory.mktemp("comfy-ttl")
    env = {**os.environ, "DISCOMFORT_REMOTE_RUN_TTL": "2"}
    with launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK, TEST_PACK], work_dir=work, env=env, api_nodes=False,
                       startup_timeout=180, log_path=work / "comfyui.log") as srv:
        yield srv, work / "comfyui.log"


def test_an_idle_run_with_a_registered_prompt_still_ends(short_ttl_server, tmp_path):
    """An idle run was kept while it had a registered prompt: a client that registers one and
    never queues or revokes it (or an orchestrator that died mid-run) held its runs and their
    memory for ever, and 32 such runs take the server's every slot. Now an idle run ends unless
    one of its prompts is queued or running in ComfyUI; the control, a run whose prompt is held
    running past the limit, lives and its prompt saves into it."""
    import time

    import requests

    srv, log = short_ttl_server
    release = tmp_path / "release"
    with RemoteContext(srv.url) as held:
        prompt = {"1": {"class_type": "PrimitiveInt", "inputs": {"value": 7}},
                  "2": {"class_type": "DiscomfortTestGate", "inputs": {"value": ["1", 0], "signal": "",
                                                                       "release": str(release)}},
                  "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "out", "input_data": ["2", 0],
                                                                   "run_id": held.run_id, "port_mode": "OUTPUT"}}}
        held.allow_prompt(prompt)
        queued = requests.post(f"{srv.url}/prompt", json={"prompt": prompt}, timeout=T)
        assert queued.status_code == 200, queued.text
        idle = RemoteContext(srv.url)
        idle.allow_prompt({"9": {"class_type": "PrimitiveInt", "inputs": {"value": 1}}})  # never queued
        end = time.monotonic() + 30
        while f"run {idle.run_id} unused for" not in log.read_text():  # the server's own timer ends it
            assert time.monotonic() < end, "the idle run with a registered prompt was never ended"
            time.sleep(0.1)
        held.stats()  # idle past the limit too, and not ended (UnknownRunError otherwise): its prompt runs
        release.touch()
        srv_history = srv.history(queued.json()["prompt_id"])
        end = time.monotonic() + 60
        while not srv_history:
            assert time.monotonic() < end, "the held prompt did not finish"
            time.sleep(0.1)
            srv_history = srv.history(queued.json()["prompt_id"])
        assert held.load("out") == 7
        with pytest.raises(UnknownRunError):
            idle.stats()
        idle.shutdown()  # already ended there: nothing to do


def test_postscript_uploaded_as_a_png_never_reaches_a_postscript_interpreter(server):
    """An attacker process uploads PostScript as "r2_evil.png" through /upload/image and binds it
    to an IMAGE port in the panel: Pillow opened it as EPS and ran Ghostscript on it (where none is
    installed: "Unable to locate Ghostscript"). Now it is read only as a PNG: 400, no interpreter."""
    from test_attacks_panel import invert_workflow

    workflows = Path(server.work_dir) / "user" / "default" / "workflows"
    workflows.mkdir(parents=True, exist_ok=True)
    (workflows / "r2_invert.json").write_text(json.dumps(invert_workflow()))
    out = subprocess.run([sys.executable, str(HERE / "_attacker_round2.py"), "eps", server.url, "r2_invert", "image"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["upload"] == 200 and got["status"] == 400, got
    assert "not a PNG image" in got["answer"]["error"] and "Ghostscript" not in got["answer"]["error"], got
